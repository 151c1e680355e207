"""How well a dictionary reconstructs its input: explained variance, MSE, cosine, norms and bias.

The statistics are sums over tokens, accumulated batch by batch, so that every reported mean is
a ratio of sums over all evaluated tokens and never a mean of batch means. Explained variance is
about the per-dimension mean of the evaluated tokens, not about zero: residual streams have a
large mean, which the about-zero form (some public notebooks) counts as explained.

The metrics, in the store's normalized units, x the input, x_hat its reconstruction, mu the
per-dimension mean of x over all evaluated tokens, N the number of tokens:

    explained_variance          1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mu||^2    (pooled)
    explained_variance_legacy   mean_t (1 - ||x_t - x_hat_t||^2 / ||x_t - mu||^2)     (per token)
    mse                         sum_t ||x_t - x_hat_t||^2 / N          (summed over dimensions)
    cossim                      mean_t cos(x_t, x_hat_t)
    l2_norm_in, l2_norm_out     mean_t ||x_t||, mean_t ||x_hat_t||
    l2_ratio                    mean_t ||x_hat_t|| / ||x_t||                   (shrinkage below 1)
    relative_reconstruction_bias  sum_t ||x_hat_t||^2 / sum_t x_t . x_hat_t
                                (E||x_hat||^2 / E[x . x_hat], Gao et al. 2024 eq. 10: the factor
                                by which the reconstruction overshoots its best rescaling; below 1
                                is shrinkage. 1 for an exact reconstruction.)

`explained_variance_legacy` is the per-token form of the SAEBench paper's tables, Neuronpedia and
the Kissane crosscoder notebook (there mu is each batch's mean; here the mean over all evaluated
tokens, the same mu as the pooled form). It is a mean of ratios, which a token near the mean
makes explode, so it is reported only under this name, for comparison with published numbers.

Comparing with SAEBench 0.6.0's core eval: its `explained_variance` puts E[x^2] where the mean
belongs, and its `mse` divides each token's squared error by the batch's token count (so it
shrinks with the batch size). Neither is reproduced here: our `explained_variance` and `mse` are
the formulas above, which is why the same SAE reads differently there. Its `l2_ratio`, `cossim`,
`l0` and `relative_reconstruction_bias` mean what ours mean (it averages the last one over
batches rather than pooling the sums).
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
    sq_out: float = 0.0  # sum ||x_hat||^2
    dot: float = 0.0  # sum x . x_hat
    ev_per_token: float = 0.0  # sum over tokens of 1 - ||x - x_hat||^2 / ||x - mu||^2

    def update(self, x: Tensor, x_hat: Tensor, mean: Tensor) -> None:
        x, x_hat = x.float().flatten(1), x_hat.float().flatten(1)
        mean = mean.to(x).flatten()
        n_in, n_out = x.norm(dim=1), x_hat.norm(dim=1)
        err = (x - x_hat).pow(2).sum(1)
        dev = (x - mean).pow(2).sum(1)
        sums = torch.stack([
            err.sum(),
            dev.sum(),
            F.cosine_similarity(x, x_hat, dim=1, eps=1e-8).sum(),
            n_in.sum(),
            n_out.sum(),
            (n_out / n_in.clamp_min(_EPS)).sum(),
            n_out.pow(2).sum(),
            (x * x_hat).sum(),
            (1.0 - err / dev.clamp_min(_EPS)).sum(),
        ]).tolist()  # one host sync per update; accumulated in Python floats (double)
        self.n += x.shape[0]
        self.sq_err += sums[0]
        self.sq_dev += sums[1]
        self.cos += sums[2]
        self.norm_in += sums[3]
        self.norm_out += sums[4]
        self.ratio += sums[5]
        self.sq_out += sums[6]
        self.dot += sums[7]
        self.ev_per_token += sums[8]

    def explained_variance(self) -> float:
        return 1.0 - self.sq_err / self.sq_dev if self.sq_dev > 0 else math.nan

    def relative_reconstruction_bias(self) -> float:
        """NaN when x . x_hat sums to 0 (e.g. a reconstruction of zeros): no rescaling fits."""
        return self.sq_out / self.dot if self.dot != 0 else math.nan

    def metrics(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"explained_variance": self.explained_variance(), "mse": self.sq_err / n,
                "cossim": self.cos / n, "l2_norm_in": self.norm_in / n,
                "l2_norm_out": self.norm_out / n, "l2_ratio": self.ratio / n,
                "relative_reconstruction_bias": self.relative_reconstruction_bias(),
                "explained_variance_legacy": self.ev_per_token / self.n if self.n else math.nan}


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the rows of x (the evaluator's formula)."""
    stats = ReconstructionStats()
    stats.update(x, x_hat, x.float().mean(0))
    return stats.explained_variance()
