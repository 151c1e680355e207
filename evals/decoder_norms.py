"""Decoder norms of a crosscoder: which model each latent belongs to, from its decoder vectors alone.

Latent j has one decoder vector per model, d_ij = W_dec[j, i]; model i's *share* is
s_ij = ||d_ij|| / sum_k ||d_kj|| (shares sum to 1). With two models the *relative norm* is
r_j = ||d_B|| / (||d_A|| + ||d_B||) = s_Bj (Anthropic's model-diffing plot; 0 = only model A uses
the latent, 1 = only model B). Classes, thresholds from [eval]:

  two models   "<A>-only"  r < specific_below
               "<B>-only"  r > specific_above
               "shared"    shared_band[0] <= r <= shared_band[1]
               "other"     anything else
  n models     "<i>-only"  s_i > specific_above, i the model with the largest share
               "shared"    every s_i >= (2 / n) * min(shared_band[0], 1 - shared_band[1]),
                           i.e. every model holds at least 2*low times the uniform share 1/n
               "other"     anything else
  any          "dead"      all decoder vectors are zero (no share is defined)

The n-model rule gives the two-model classes when the thresholds are symmetric (the defaults
0.1 / 0.9 and [0.3, 0.7] are). The cosine similarity of a latent's decoder vectors (two models:
cos(d_A, d_B); n models: the mean over pairs) says whether a shared latent means the same
direction in every model. Model-specificity is max_i s_i - 1/n (= |r - 0.5| for two).

A pure function of the decoder: no store, no activations. The plots are in evals/plots.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from evals.config import EvalSpec

SHARED, OTHER, DEAD = "shared", "other", "dead"


def only(name: str) -> str:
    """The class of latents specific to model `name`."""
    return f"{name}-only"


@dataclass
class NormAnalysis:
    """Per-latent decoder norms of a crosscoder, their shares, classes and cosine similarities."""

    model_names: list[str]
    norms: np.ndarray  # [n_latents, n_models] ||W_dec[j, i]||
    shares: np.ndarray  # [n_latents, n_models] norms / norms.sum(1); NaN for dead latents
    classes: np.ndarray  # [n_latents] class names (str)
    cosine: np.ndarray  # [n_latents] (mean pairwise) cosine of the decoder vectors; NaN if one is 0
    thresholds: dict  # the rule's thresholds, as used

    @property
    def n_latents(self) -> int:
        return self.norms.shape[0]

    @property
    def n_models(self) -> int:
        return self.norms.shape[1]

    @property
    def relative(self) -> np.ndarray | None:
        """[n_latents] r = ||d_B|| / (||d_A|| + ||d_B||) for two models (NaN when dead), else None."""
        return self.shares[:, 1] if self.n_models == 2 else None

    @property
    def class_names(self) -> list[str]:
        return [only(n) for n in self.model_names] + [SHARED, OTHER, DEAD]

    @property
    def counts(self) -> dict[str, int]:
        return {c: int((self.classes == c).sum()) for c in self.class_names}

    def ids(self, cls: str) -> np.ndarray:
        """Latent ids of one class, ascending."""
        return np.flatnonzero(self.classes == cls)

    @property
    def shared_cosine(self) -> np.ndarray:
        """Cosine similarities of the shared latents (finite values only)."""
        c = self.cosine[self.classes == SHARED]
        return c[np.isfinite(c)]

    @property
    def specificity(self) -> np.ndarray:
        """[n_latents] max_i share_i - 1/n: 0 = perfectly balanced, 1 - 1/n = one model only; NaN dead."""
        return np.max(self.shares, axis=1) - 1.0 / self.n_models

    @property
    def favoured(self) -> np.ndarray:
        """[n_latents] the model with the largest share (-1 for dead latents)."""
        out = np.full(self.n_latents, -1, dtype=np.int64)
        alive = self.classes != DEAD
        out[alive] = np.argmax(self.shares[alive], axis=1)
        return out

    def summary(self) -> dict:
        cos = self.shared_cosine
        return {"models": list(self.model_names), "n_latents": self.n_latents,
                "counts": self.counts, "thresholds": self.thresholds,
                "shared_cosine": {"n": int(cos.size),
                                  "mean": float(cos.mean()) if cos.size else None,
                                  "median": float(np.median(cos)) if cos.size else None,
                                  "below_0.5": int((cos < 0.5).sum())}}


def _as_tensor(w) -> Tensor:
    return w.detach().to("cpu", torch.float64) if isinstance(w, Tensor) else torch.as_tensor(
        np.asarray(w), dtype=torch.float64)


def decoder_norm_analysis(W_dec: Tensor | np.ndarray, model_names: Sequence[str] | None = None,
                          spec: EvalSpec | None = None, *, block: int = 8192) -> NormAnalysis:
    """Norms, shares, classes and cosines of W_dec [n_latents, n_models, d_model] (n_models >= 2).

    Thresholds come from `spec` (default EvalSpec()); the class rules are in the module docstring.
    Use the unfolded dictionary: folding divides model i's decoder by its scale and would move
    every share.
    """
    spec = spec or EvalSpec()
    w_all = W_dec.detach() if isinstance(W_dec, Tensor) else torch.as_tensor(np.asarray(W_dec))
    if w_all.dim() != 3 or w_all.shape[1] < 2:
        raise ValueError(f"need W_dec [n_latents, n_models >= 2, d_model], got {tuple(w_all.shape)}")
    m, n, _ = w_all.shape
    names = list(model_names) if model_names is not None else [f"model{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} model names for {n} models")
    norms = np.empty((m, n))
    cosine = np.empty(m)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for lo in range(0, m, block):  # blocks: a float64 copy of a 131k x 2 x 2304 decoder is 5 GB
        w = _as_tensor(w_all[lo:lo + block])
        nrm = w.norm(dim=-1)
        unit = w / nrm.clamp_min(1e-300)[..., None]
        cos = sum((unit[:, i] * unit[:, j]).sum(-1) for i, j in pairs) / len(pairs)
        cos[(nrm == 0).any(1)] = float("nan")
        norms[lo:lo + block] = nrm.numpy()
        cosine[lo:lo + block] = cos.numpy()

    total = norms.sum(1)
    dead = ~(total > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = norms / total[:, None]
    shares[dead] = np.nan
    classes = np.full(m, OTHER, dtype=object)
    lo_b, hi_b = spec.shared_band
    if n == 2:
        r = np.nan_to_num(shares[:, 1], nan=-1.0)  # dead latents match no rule (set below)
        classes[(r >= lo_b) & (r <= hi_b)] = SHARED
        classes[(r < spec.specific_below) & (r >= 0)] = only(names[0])
        classes[r > spec.specific_above] = only(names[1])
        thresholds = {"rule": "relative norm r = |d_B| / (|d_A| + |d_B|)",
                      "specific_below": spec.specific_below, "specific_above": spec.specific_above,
                      "shared_band": [lo_b, hi_b]}
    else:
        floor = 2.0 / n * min(lo_b, 1.0 - hi_b)
        s = np.nan_to_num(shares, nan=-1.0)
        classes[np.all(s >= floor, axis=1)] = SHARED
        top = s.argmax(1)
        specific = s.max(1) > spec.specific_above
        classes[specific] = np.array([only(x) for x in names], dtype=object)[top[specific]]
        thresholds = {"rule": "share s_i = |d_i| / sum_k |d_k|", "specific_above": spec.specific_above,
                      "shared_min_share": floor}
    classes[dead] = DEAD
    return NormAnalysis(names, norms, shares, classes.astype(str), cosine, thresholds)


def rank_specific(a: NormAnalysis, top: int) -> dict[int, np.ndarray]:
    """Per model i: the `top` live latents whose largest share is model i's, most specific first
    (two models: by |r - 0.5| descending, split by the side of 0.5)."""
    spec, fav = a.specificity, a.favoured
    out = {}
    for i in range(a.n_models):
        ids = np.flatnonzero(fav == i)
        order = np.argsort(-spec[ids], kind="stable")
        out[i] = ids[order][:top]
    return out
