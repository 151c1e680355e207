"""Logistic-regression probes in plain torch: the L2 probes SAEBench fits with scikit-learn, and
the L1 probe it trains with Adam to rank latents.

`fit_logistic` minimises, for each of P independent problems p,

    sum_n s_np * BCE(y_np, x_np . w_p + b_p) + (l2 / 2) * ||w_p||^2        (bias not penalised)

which is scikit-learn's LogisticRegression(C = 1 / l2) objective with sample weights s (its
class_weight="balanced" is `balanced_weights`). The problems share one L-BFGS run: their losses
add and their parameters are disjoint, so the joint minimum is every problem's minimum. Running
to convergence (not a fixed number of epochs) makes the probe a function of the data alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

_EPS = 1e-12


def balanced_weights(y: Tensor) -> Tensor:
    """[N, P] weights n / (2 n_class) per problem (scikit-learn's class_weight="balanced")."""
    y = y.float()
    n = y.shape[0]
    pos = y.sum(0)
    neg = n - pos
    w_pos = torch.where(pos > 0, n / (2 * pos.clamp_min(1)), torch.zeros_like(pos))
    w_neg = torch.where(neg > 0, n / (2 * neg.clamp_min(1)), torch.zeros_like(neg))
    return y * w_pos + (1 - y) * w_neg


def pos_weighted(y: Tensor) -> Tensor:
    """[N, P] weights 1 for negatives and n_neg / n_pos for positives (BCE with pos_weight)."""
    y = y.float()
    pos = y.sum(0)
    return torch.where(y > 0, ((y.shape[0] - pos) / pos.clamp_min(1)).expand_as(y), torch.ones_like(y))


def bce(z: Tensor, y: Tensor) -> Tensor:
    """Elementwise binary cross entropy of logits z against 0/1 targets y: log(1 + e^z) - y z, the
    same value as torch's binary_cross_entropy_with_logits, which measured 10-100x slower on small
    CPU tensors."""
    return torch.logaddexp(torch.zeros_like(z), z) - y * z


def logits(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """[N, P] scores of x [N, D] (shared by the problems) or [P, N, D] (one input per problem)."""
    if x.dim() == 2:
        return x @ weight.T + bias
    return torch.einsum("pnd,pd->np", x, weight) + bias


def fit_logistic(x: Tensor, y: Tensor, *, sample_weight: Tensor | None = None, l2: float = 1.0,
                 max_iter: int = 1000, tol: float = 1e-7) -> tuple[Tensor, Tensor]:
    """(weight [P, D], bias [P]) minimising the objective in the module docstring.

    x [N, D] or [P, N, D]; y [N, P] of 0/1. Float64 on a CPU (exact enough to compare with a
    brute-force solution), float32 on a GPU.
    """
    dtype = torch.float64 if x.device.type == "cpu" else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    if y.dim() == 1:
        y = y[:, None]
    p, d = y.shape[1], x.shape[-1]
    s = torch.ones_like(y) if sample_weight is None else sample_weight.to(y)
    scale = 1.0 / max(float(s.sum()) / p, _EPS)  # the mean loss: better conditioned, same minimum
    weight = torch.zeros(p, d, dtype=dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(p, dtype=dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=tol, tolerance_change=tol * 1e-3, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = logits(x, weight, bias)
        loss = (s * bce(z, y)).sum()
        loss = scale * (loss + 0.5 * l2 * weight.pow(2).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def fit_l1_probe(x: Tensor, y: Tensor, encode: Callable[[Tensor], Tensor], n_features: int, *,
                 l1: float, epochs: int, batch_size: int | None = None, lr: float = 1e-2, end_lr: float = 1e-5,
                 weight_decay: float = 1e-6, seed: int = 0) -> Tensor:
    """[P, n_features] weights of SAEBench's latent-ranking probe: BCE (pos_weight) on encode(x)
    plus l1 * mean_p ||w_p||_1, Adam with an exponential decay lr -> end_lr over `epochs`.

    The codes are computed per batch (`encode` maps [b, d] inputs to [b, n_features]), so a
    dictionary of a million latents never materialises its codes for every word. The batch order
    comes from a seeded generator: the ranking is reproducible. The batch is SAEBench's 4096 rows,
    or an eighth of the rows when that is smaller: with a few thousand words (a CPU-sized run) a
    4096-row batch would leave one Adam step per epoch, too few to rank anything.
    """
    if batch_size is None:
        batch_size = min(4096, max(64, x.shape[0] // 8))
    y = y.float()
    gen = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(n_features, y.shape[1]).to(x.device)
    with torch.no_grad():  # a deterministic initialisation, independent of global RNG state
        bound = 1 / math.sqrt(n_features)
        probe.weight.copy_((torch.rand(probe.weight.shape, generator=gen) * 2 - 1) * bound)
        probe.bias.copy_((torch.rand(probe.bias.shape, generator=gen) * 2 - 1) * bound)
    weights = pos_weighted(y).to(x.device)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(x.shape[0], generator=gen).split(batch_size):
                idx = idx.to(x.device)
                with torch.no_grad():
                    f = encode(x[idx]).float()
                loss = (weights[idx] * bce(probe(f), y[idx])).mean() + l1 * probe.weight.abs().sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    return probe.weight.detach()


def f1_scores(truth: Tensor, predicted: Tensor) -> Tensor:
    """[P] F1 of boolean predictions [N, P] against truth [N, P] (0 where there is nothing to find)."""
    truth, predicted = truth.bool(), predicted.bool()
    tp = (truth & predicted).sum(0).double()
    denom = truth.sum(0).double() + predicted.sum(0).double()
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


def accuracy(truth: Tensor, scores: Tensor) -> Tensor:
    """[P] fraction of rows where (score > 0) equals the 0/1 truth."""
    return ((scores > 0) == truth.bool()).double().mean(0)
