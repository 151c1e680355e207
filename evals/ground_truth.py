"""Dictionaries scored against known features (synthetic data), and the true L0 read off a k sweep.

On data made by mdiff/synthetic.py the features are known, so a dictionary can be checked
directly instead of through proxies:

* recovery: for each true feature, the best cosine similarity with any decoder row; a feature
  counts as recovered above 0.9;
* the feature-by-latent cosine matrix, latents reordered so that each feature's best latent sits on
  the diagonal (a clean dictionary shows a bright diagonal, a mixed one smeared rows);
* variance explained by the learned dictionary and by the ground-truth dictionary (encoder and
  decoder = the true features) at the same k, both selecting the k * batch largest codes of the
  evaluation set, as BatchTopK trains; variance is taken about the mean, as everywhere in mdiff.

The decoder projection (Chanin and Garriga-Alonso, "Sparse but Wrong", 2025): project inputs on
the decoder rows, p = (x - b_dec) W_dec^T, and call dp_n the value that on average n projections
per input exceed (the (n * batch)-th largest over the batch). Below the true L0 a dictionary hedges
frequent features into its other latents, so inputs project onto latents whose feature is absent
and dp_n (for n above the true L0) stays high; from the true L0 on, latents are clean and dp_n
drops to its floor. `estimate_true_l0` reads the start of that floor off a k sweep.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trainer.config import DictionarySpec
from trainer.dictionaries import Dictionary, build_dictionary

from .plots import figure

RECOVERED_ABOVE = 0.9
_EPS = 1e-12


def decoder_rows(dictionary: Dictionary) -> Tensor:
    if dictionary.n_models != 1:
        raise ValueError(f"ground-truth metrics are for SAEs (one model); this dictionary reads "
                         f"{dictionary.n_models} models")
    return dictionary.W_dec.detach()[:, 0, :]


def cosine_matrix(features: Tensor, decoder: Tensor) -> Tensor:
    """[n_features, n_latents] cosine similarity of each true feature with each decoder row."""
    f = features.double()
    w = decoder.double()
    f = f / f.norm(dim=1, keepdim=True).clamp_min(_EPS)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(_EPS)
    return f @ w.T


@dataclass
class Recovery:
    best_cosine: np.ndarray  # [n_features]: best cosine with any latent
    best_latent: np.ndarray  # [n_features]: which latent
    threshold: float

    @property
    def n_recovered(self) -> int:
        return int((self.best_cosine > self.threshold).sum())

    @property
    def fraction(self) -> float:
        return self.n_recovered / len(self.best_cosine)


def feature_recovery(features: Tensor, dictionary: Dictionary, threshold: float = RECOVERED_ABOVE
                     ) -> Recovery:
    cos = cosine_matrix(features, decoder_rows(dictionary))
    best = cos.max(dim=1)
    return Recovery(best.values.numpy(), best.indices.numpy(), threshold)


def matching_order(cos: Tensor) -> np.ndarray:
    """A latent order that puts each feature's best available latent at the feature's column:
    pairs are taken greedily from the highest cosine down; unmatched latents go last."""
    c = cos.numpy() if isinstance(cos, Tensor) else np.asarray(cos)
    n_f, n_l = c.shape
    slot = {}
    used = set()
    for flat in np.argsort(-c, axis=None, kind="stable"):
        f, lat = divmod(int(flat), n_l)
        if f in slot or lat in used:
            continue
        slot[f] = lat
        used.add(lat)
        if len(slot) == min(n_f, n_l):
            break
    order = [slot[f] for f in range(n_f) if f in slot]
    return np.array(order + [lat for lat in range(n_l) if lat not in used], dtype=np.int64)


def plot_cosine_matrix(cos: Tensor, path: str | Path, title: str) -> Path:
    """Heatmap of features (rows, in their order: most frequent first) by matched latents."""
    c = cos.numpy() if isinstance(cos, Tensor) else np.asarray(cos)
    order = matching_order(c)
    n_f, n_l = c.shape
    fig, axes = figure(size=(max(4.0, 0.09 * n_l + 2.0), max(2.5, 0.07 * n_f + 1.5)))
    ax = axes[0, 0]
    im = ax.imshow(c[:, order], cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xlabel("latent (reordered to match features)")
    ax.set_ylabel("true feature (most frequent first)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="cosine similarity", shrink=0.9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def ground_truth_dictionary(features: Tensor, k: int) -> Dictionary:
    """A BatchTopK SAE whose decoder rows are the true features and whose encoder is their
    transpose (exact inversion when the features are orthonormal), biases zero."""
    n, d = features.shape
    spec = DictionarySpec(name="ground-truth", architecture="batchtopk", n_latents=n, k=k)
    sae = build_dictionary(spec, 1, d)
    f = features.float()
    with torch.no_grad():
        sae.W_dec.copy_(f[:, None, :])
        sae.W_enc.copy_(f.T[None])
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@torch.no_grad()
def variance_explained(dictionary: Dictionary, x: Tensor, k: int) -> float:
    """1 - FVU with the k * n largest codes of the n rows kept (batch top-k over the whole set)."""
    pre = dictionary.pre_activations(x)
    flat = pre.flatten()
    keep = flat.topk(min(k * x.shape[0], flat.numel()), sorted=False).indices
    f = torch.zeros_like(flat).scatter_(0, keep, flat[keep].relu()).view_as(pre)
    err = (x - dictionary.decode(f)).pow(2).sum()
    var = (x - x.mean(0)).pow(2).sum().clamp_min(_EPS)
    return float(1 - err / var)


@torch.no_grad()
def decoder_projections(dictionary: Dictionary, x: Tensor, ns: Sequence[int]) -> dict[int, float]:
    """dp_n for each n: the (n * batch)-th largest of (x - b_dec) W_dec^T over all rows and latents."""
    w = decoder_rows(dictionary)
    proj = (x[:, 0, :] - dictionary.b_dec.detach()[0]) @ w.T
    top = proj.flatten().topk(min(max(ns) * x.shape[0] + 1, proj.numel())).values
    return {n: float(top[min(n * x.shape[0], top.numel() - 1)]) for n in ns}


@dataclass
class L0Estimate:
    """The true L0 read off decoder-projection curves of a k sweep."""

    estimate: float | None  # median over the informative n; None when none is informative
    per_n: dict[int, int]  # n -> the k where dp_n reaches its floor
    argmin_per_n: dict[int, int]  # n -> the k of the smallest dp_n, for comparison
    skipped: dict[int, str] = field(default_factory=dict)  # n -> why it says nothing


def estimate_true_l0(ks: Sequence[int], dp: dict[int, Sequence[float]], *, floor_tolerance: float = 0.1,
                     min_drop: float = 0.05, near_zero: float = 0.1) -> L0Estimate:
    """Where the decoder-projection curves stop falling: the smallest k within `floor_tolerance`
    of each curve's range above its minimum, the median over the n that carry the signal.

    `dp[n][i]` is dp_n of the dictionary trained at `ks[i]`. A curve is informative when its n is
    above the true L0 for the best dictionaries: its minimum is near zero (below `near_zero` times
    its maximum) while its maximum is clearly positive (at least `min_drop` times the typical
    active projection, the median dp_1). Smaller n sit among active features' projections; much
    larger n among negative projections; neither says where hedging stops.
    """
    order = np.argsort(ks)
    k_sorted = np.asarray(ks)[order]
    scale = statistics.median(dp[1]) if 1 in dp else max(max(v) for v in dp.values())
    per_n, argmin_per_n, skipped = {}, {}, {}
    for n, values in sorted(dp.items()):
        v = np.asarray(values, dtype=float)[order]
        lo, hi = float(v.min()), float(v.max())
        argmin_per_n[n] = int(k_sorted[int(v.argmin())])
        if hi < min_drop * scale:
            skipped[n] = f"curve stays near zero (max {hi:.3g})"
            continue
        if lo > near_zero * hi:
            skipped[n] = f"no dictionary brings it near zero (min {lo:.3g}, max {hi:.3g})"
            continue
        per_n[n] = int(k_sorted[int(np.argmax(v <= lo + floor_tolerance * (hi - lo)))])
    estimate = float(statistics.median(per_n.values())) if per_n else None
    return L0Estimate(estimate, per_n, argmin_per_n, skipped)
