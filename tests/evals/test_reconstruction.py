"""Reconstruction statistics against brute-force computations in float64, token by token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evals.reconstruction import ReconstructionStats


def brute_force(x: np.ndarray, x_hat: np.ndarray) -> dict[str, float]:
    """Every metric from its definition, one token at a time, in float64."""
    x, x_hat = x.reshape(len(x), -1).astype(np.float64), x_hat.reshape(len(x_hat), -1).astype(np.float64)
    mu = x.mean(0)
    err = [float(np.sum((a - b) ** 2)) for a, b in zip(x, x_hat)]
    dev = [float(np.sum((a - mu) ** 2)) for a in x]
    norms_in = [float(np.linalg.norm(a)) for a in x]
    norms_out = [float(np.linalg.norm(b)) for b in x_hat]
    return {
        "explained_variance": 1 - sum(err) / sum(dev),
        "explained_variance_legacy": sum(1 - e / d for e, d in zip(err, dev)) / len(x),
        "mse": sum(err) / len(x),
        "cossim": sum(float(a @ b) / (na * nb) for a, b, na, nb in zip(x, x_hat, norms_in, norms_out)) / len(x),
        "l2_norm_in": sum(norms_in) / len(x),
        "l2_norm_out": sum(norms_out) / len(x),
        "l2_ratio": sum(nb / na for na, nb in zip(norms_in, norms_out)) / len(x),
        "relative_reconstruction_bias": sum(nb ** 2 for nb in norms_out) / sum(float(a @ b) for a, b in zip(x, x_hat)),
    }


def accumulated(x: torch.Tensor, x_hat: torch.Tensor, batch: int) -> dict[str, float]:
    stats = ReconstructionStats()
    mean = x.double().mean(0)
    for lo in range(0, len(x), batch):
        stats.update(x[lo:lo + batch], x_hat[lo:lo + batch], mean)
    return stats.metrics()


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_every_metric_matches_the_brute_force_computation(batch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 12, generator=gen) * 3 + torch.linspace(-5, 5, 12)  # a large mean, as residuals have
    x_hat = 0.8 * x + 0.5 * torch.randn(50, 12, generator=gen) + 0.3
    got = accumulated(x, x_hat, batch)
    want = brute_force(x.numpy(), x_hat.numpy())
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_crosscoder_inputs_pool_the_models_into_one_vector():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 2, 5, generator=gen)
    x_hat = x + 0.2 * torch.randn(20, 2, 5, generator=gen)
    got = accumulated(x, x_hat, 8)
    want = brute_force(x.numpy(), x_hat.numpy())
    for key in ("relative_reconstruction_bias", "explained_variance_legacy"):
        assert got[key] == pytest.approx(want[key], rel=1e-5)


def test_relative_reconstruction_bias_is_the_overshoot_of_a_scaled_reconstruction():
    # x_hat = c x gives sum ||c x||^2 / sum c ||x||^2 = c exactly: 1 for a perfect reconstruction,
    # below 1 for shrinkage
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(2))
    for c in (1.0, 0.5, 1.5):
        assert accumulated(x, c * x, 10)["relative_reconstruction_bias"] == pytest.approx(c, rel=1e-6)


def test_legacy_form_differs_from_the_pooled_one_where_a_token_sits_near_the_mean():
    # one token close to the mean with a small absolute error: its ratio is huge, so the mean of
    # ratios falls far below the pooled ratio of sums (why the legacy form is reported apart)
    x = torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 0.001]])
    x_hat = x + torch.tensor([[0.1, 0.0], [0.1, 0.0], [0.1, 0.0]])
    m = accumulated(x, x_hat, 3)
    want = brute_force(x.numpy(), x_hat.numpy())
    assert m["explained_variance_legacy"] == pytest.approx(want["explained_variance_legacy"], rel=1e-4)
    assert m["explained_variance"] > 0.9 and m["explained_variance_legacy"] < -1000


def test_a_reconstruction_of_zeros_has_no_bias_ratio():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    m = accumulated(x, torch.zeros_like(x), 4)
    assert math.isnan(m["relative_reconstruction_bias"]) and m["l2_ratio"] == 0.0
