"""How well a dictionary reconstructs its input: explained variance, MSE, cosine and norms.

The statistics are sums over tokens, accumulated batch by batch, so that every reported mean is
a ratio of sums over all evaluated tokens and never a mean of batch means. Explained variance is
about the per-dimension mean of the evaluated tokens, not about zero: residual streams have a
large mean, which the about-zero form (some public notebooks) counts as explained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12


@dataclass
class ReconstructionStats:
    """Sums over tokens for one model's reconstruction (or several models' pooled).

    `update(x, x_hat, mean)` takes [tokens, d] (or [tokens, n_models, d], pooled as one vector of
    n_models*d) and the per-dimension mean of x over *all* evaluated tokens, computed beforehand,
    so that the variance is about the mean exactly and not via sum x^2 - N mean^2.
    """

    n: int = 0
    sq_err: float = 0.0
    sq_dev: float = 0.0
    cos: float = 0.0
    norm_in: float = 0.0
    norm_out: float = 0.0
    ratio: float = 0.0

    def update(self, x: Tensor, x_hat: Tensor, mean: Tensor) -> None:
        x, x_hat = x.float().flatten(1), x_hat.float().flatten(1)
        mean = mean.to(x).flatten()
        n_in, n_out = x.norm(dim=1), x_hat.norm(dim=1)
        sums = torch.stack([
            (x - x_hat).pow(2).sum(),
            (x - mean).pow(2).sum(),
            F.cosine_similarity(x, x_hat, dim=1, eps=1e-8).sum(),
            n_in.sum(),
            n_out.sum(),
            (n_out / n_in.clamp_min(_EPS)).sum(),
        ]).tolist()  # one host sync per update; accumulated in Python floats (double)
        self.n += x.shape[0]
        self.sq_err += sums[0]
        self.sq_dev += sums[1]
        self.cos += sums[2]
        self.norm_in += sums[3]
        self.norm_out += sums[4]
        self.ratio += sums[5]

    def explained_variance(self) -> float:
        return 1.0 - self.sq_err / self.sq_dev if self.sq_dev > 0 else math.nan

    def metrics(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"explained_variance": self.explained_variance(), "mse": self.sq_err / n,
                "cossim": self.cos / n, "l2_norm_in": self.norm_in / n,
                "l2_norm_out": self.norm_out / n, "l2_ratio": self.ratio / n}


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the rows of x (the evaluator's formula)."""
    stats = ReconstructionStats()
    stats.update(x, x_hat, x.float().mean(0))
    return stats.explained_variance()
