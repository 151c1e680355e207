"""The probes' logistic regressions against brute-force solutions: Newton's method on the same
objective in float64, and the optimality condition (zero gradient) checked directly."""

from __future__ import annotations

import pytest
import torch

from evals.saebench.logistic import (
    accuracy,
    balanced_weights,
    bce,
    f1_scores,
    fit_l1_probe,
    fit_logistic,
    pos_weighted,
)


def objective(x, y, s, l2, w, b):
    z = x @ w + b
    return (s * (torch.log(1 + torch.exp(z)) - y * z)).sum() + 0.5 * l2 * (w @ w)


def newton(x, y, s, l2, steps=60):
    """The minimiser by Newton's method with autograd's exact Hessian (one problem, float64)."""
    theta = torch.zeros(x.shape[1] + 1, dtype=torch.float64)

    def f(t):
        return objective(x, y, s, l2, t[:-1], t[-1])

    for _ in range(steps):
        g = torch.autograd.functional.jacobian(f, theta)
        h = torch.autograd.functional.hessian(f, theta)
        theta = theta - torch.linalg.solve(h, g)
    return theta[:-1], theta[-1]


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    true = torch.tensor([[1.5, -2.0, 0.0, 0.5, 0.0], [0.0, 1.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    y = (torch.rand(200, 2, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ true.T - 0.7)).double()
    return x, y


@pytest.mark.parametrize("l2", [1.0, 0.05])
def test_fit_matches_newtons_method(data, l2):
    x, y = data
    s = balanced_weights(y).double()
    weight, bias = fit_logistic(x, y, sample_weight=s, l2=l2)
    for p in range(2):
        w, b = newton(x, y[:, p], s[:, p], l2)
        assert torch.allclose(weight[p], w, atol=1e-4) and abs(float(bias[p] - b)) < 1e-4


def test_shared_and_per_problem_inputs_agree(data):
    x, y = data
    w1, b1 = fit_logistic(x, y, l2=1.0)
    w2, b2 = fit_logistic(torch.stack([x, x]), y, l2=1.0)
    assert torch.allclose(w1, w2, atol=1e-6) and torch.allclose(b1, b2, atol=1e-6)
    # different inputs per problem: each problem's gradient vanishes at the joint solution
    xs = torch.stack([x, x[:, [4, 3, 2, 1, 0]] * 2])
    w, b = fit_logistic(xs, y, l2=1.0)
    for p in range(2):
        wp, bp = w[p].clone().requires_grad_(), b[p].clone().requires_grad_()
        objective(xs[p], y[:, p], torch.ones(200, dtype=torch.float64), 1.0, wp, bp).backward()
        assert wp.grad.abs().max() < 1e-3 and abs(float(bp.grad)) < 1e-3


def test_class_weights_match_their_definitions():
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    # balanced: n / (2 n_class) -> 4 / (2 * 2) = 1 for both classes of problem 0; problem 1 has no
    # positive: its negatives weigh 4 / (2 * 4)
    assert balanced_weights(y).tolist() == [[1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5]]
    y = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    assert pos_weighted(y)[:, 0].tolist() == [3.0, 1.0, 1.0, 1.0]


def test_bce_equals_torchs():
    z = torch.linspace(-30, 30, 61, dtype=torch.float64)
    for target in (0.0, 1.0):
        y = torch.full_like(z, target)
        want = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
        assert torch.allclose(bce(z, y), want, atol=1e-12)


def test_f1_and_accuracy_by_counting():
    truth = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 1]]).bool()
    pred = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]]).bool()
    # problem 0: tp 1, fp 1, fn 1 -> F1 = 2 / (2 + 1 + 1); problem 1: nothing found of one
    assert f1_scores(truth, pred).tolist() == pytest.approx([0.5, 0.0])
    scores = torch.tensor([[2.0, -1.0], [-1.0, -1.0], [0.5, -1.0], [-3.0, -1.0]])
    assert accuracy(truth.float(), scores).tolist() == pytest.approx([0.5, 0.75])


def test_l1_probe_ranks_the_informative_feature_first_and_is_reproducible():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randn(400, 8, generator=gen).relu()  # non-negative, as an SAE's codes
    y = torch.stack([(codes[:, 3] > 0.5).float(), (codes[:, 6] > 0.2).float()], 1)
    kw = dict(l1=0.01, epochs=50, batch_size=64, seed=5)
    w = fit_l1_probe(codes, y, lambda v: v, 8, **kw)
    assert w[0].argmax() == 3 and w[1].argmax() == 6  # largest weight: the latent predicting the class
    assert torch.equal(w, fit_l1_probe(codes, y, lambda v: v, 8, **kw))
