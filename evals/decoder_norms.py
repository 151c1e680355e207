"""Decoder norms of a crosscoder: which model each latent belongs to, from its decoder vectors alone.

Latent j has one decoder vector per model, d_ij = W_dec[j, i]; model i's *share* is
s_ij = ||d_ij|| / sum_k ||d_kj|| (shares sum to 1). Two models, A and B, have two relative norms
in the literature, and both are computed for every latent (0 = only A uses it, 1 = only B):

  r      = ||d_B|| / (||d_A|| + ||d_B||) = s_B       Anthropic's model-diffing plot; Kissane et al.
  delta  = 1/2 ((||d_B|| - ||d_A||) / max(||d_A||, ||d_B||) + 1)        Minder et al. ("Δnorm")

They agree at 0, 1/2 and 1 only: delta >= 0.9 is r >= 0.833, delta in [0.4, 0.6] is r in
[0.444, 0.556], so "exclusive" and "shared" mean different latents under each; every output
names the one its classes use (`[eval] relative_norm`). Classes, thresholds from [eval]:

  two models, r       "<A>-only"  r < specific_below          "<B>-only"  r > specific_above
                      "shared"    low <= r <= high (shared_band, default [0.3, 0.7])
  two models, delta   "<A>-only"  delta <= specific_below     "<B>-only"  delta >= specific_above
                      "shared"    low <= delta <= high (shared_band, default [0.4, 0.6])
                      (inclusive, as Minder et al. state them)
  n models            "<i>-only"  s_i > specific_above, i the model with the largest share
                      "shared"    every s_i >= (2 / n) * min(low, 1 - high), i.e. every model holds
                                  at least 2*low times the uniform share 1/n (delta is a two-model
                                  measure: with more models the shares decide)
  any                 "other"     anything else
                      "dead"      dead latents, which take no other class and stay out of the
                                  histograms: latents marked dead by the caller (the training
                                  definition when the dictionary records it, else latents silent on
                                  the scanned tokens; `dead_definition` says which) and latents
                                  whose decoder vectors are all zero (no share is defined). Never
                                  trained, their decoders keep the initial r = delta = 0.5 and
                                  would fill the "shared" class.

The n-model rule gives the two-model r classes when the thresholds are symmetric (the defaults
are). The cosine similarity of a latent's decoder vectors (two models: cos(d_A, d_B); n models:
the mean over pairs) says whether a shared latent means the same direction in every model.
Model-specificity is max_i s_i - 1/n (= |r - 0.5| for two).

A pure function of the decoder (and the dead mask it is given): no store, no activations. The
plots are in evals/plots.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from evals.config import EvalSpec, shared_band

SHARED, OTHER, DEAD = "shared", "other", "dead"
R, DELTA = "r", "delta"
# how each relative norm is written wherever it appears (JSON, CSV headers, axis labels, captions)
FORMULAS = {R: "r = |d_B| / (|d_A| + |d_B|) (Anthropic; Kissane et al.)",
            DELTA: "delta = 1/2 ((|d_B| - |d_A|) / max(|d_A|, |d_B|) + 1) (Minder et al.)"}
COLUMNS = {R: "relative_norm_r", DELTA: "relative_norm_delta"}  # per-latent keys and CSV columns
ZERO_DECODER = "all decoder vectors zero"


def only(name: str) -> str:
    """The class of latents specific to model `name`."""
    return f"{name}-only"


def relative_norm_r(norm_a: np.ndarray, norm_b: np.ndarray) -> np.ndarray:
    """r = |d_B| / (|d_A| + |d_B|); NaN where both are 0."""
    a, b = np.asarray(norm_a, np.float64), np.asarray(norm_b, np.float64)
    total = a + b
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, b / np.where(total > 0, total, 1.0), np.nan)


def relative_norm_delta(norm_a: np.ndarray, norm_b: np.ndarray) -> np.ndarray:
    """delta = 1/2 ((|d_B| - |d_A|) / max(|d_A|, |d_B|) + 1); NaN where both are 0."""
    a, b = np.asarray(norm_a, np.float64), np.asarray(norm_b, np.float64)
    top = np.maximum(a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(top > 0, 0.5 * ((b - a) / np.where(top > 0, top, 1.0) + 1.0), np.nan)


@dataclass
class NormAnalysis:
    """Per-latent decoder norms of a crosscoder, their shares, classes and cosine similarities."""

    model_names: list[str]
    norms: np.ndarray  # [n_latents, n_models] ||W_dec[j, i]||
    shares: np.ndarray  # [n_latents, n_models] norms / norms.sum(1); NaN for zero decoders
    classes: np.ndarray  # [n_latents] class names (str)
    cosine: np.ndarray  # [n_latents] (mean pairwise) cosine of the decoder vectors; NaN if one is 0
    thresholds: dict  # the rule's thresholds, as used, with the convention's name and formula
    convention: str = R  # which relative norm the two-model classes use (R or DELTA); shares for n > 2
    dead: np.ndarray | None = None  # [n_latents] bool: class DEAD (given mask | zero decoders)
    dead_definition: str = ZERO_DECODER

    def __post_init__(self) -> None:
        if self.dead is None:
            self.dead = self.classes == DEAD

    @property
    def n_latents(self) -> int:
        return self.norms.shape[0]

    @property
    def n_models(self) -> int:
        return self.norms.shape[1]

    @property
    def relative(self) -> np.ndarray | None:
        """[n_latents] r = ||d_B|| / (||d_A|| + ||d_B||) for two models (NaN for zero decoders), else None.
        Dead latents keep their value; the classes and plots leave them out."""
        return relative_norm_r(self.norms[:, 0], self.norms[:, 1]) if self.n_models == 2 else None

    @property
    def delta(self) -> np.ndarray | None:
        """[n_latents] Minder et al.'s delta for two models (NaN for zero decoders), else None."""
        return relative_norm_delta(self.norms[:, 0], self.norms[:, 1]) if self.n_models == 2 else None

    def values(self, convention: str) -> np.ndarray | None:
        """The relative norm of one convention (R or DELTA) per latent; None unless two models."""
        return {R: self.relative, DELTA: self.delta}[convention]

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
        out = np.max(self.shares, axis=1) - 1.0 / self.n_models
        out[self.dead] = np.nan
        return out

    @property
    def favoured(self) -> np.ndarray:
        """[n_latents] the model with the largest share (-1 for dead latents)."""
        out = np.full(self.n_latents, -1, dtype=np.int64)
        alive = ~self.dead
        out[alive] = np.argmax(self.shares[alive], axis=1)
        return out

    def summary(self) -> dict:
        cos = self.shared_cosine
        out = {"models": list(self.model_names), "n_latents": self.n_latents,
               "class_convention": self.convention if self.n_models == 2 else "share",
               "counts": self.counts, "thresholds": self.thresholds,
               "dead_excluded": {"count": int(self.dead.sum()), "definition": self.dead_definition},
               "shared_cosine": {"n": int(cos.size),
                                 "mean": float(cos.mean()) if cos.size else None,
                                 "median": float(np.median(cos)) if cos.size else None,
                                 "below_0.5": int((cos < 0.5).sum())}}
        if self.n_models == 2:
            out["relative_norms"] = {COLUMNS[c]: FORMULAS[c] for c in (R, DELTA)}
        return out


def _as_tensor(w) -> Tensor:
    return w.detach().to("cpu", torch.float64) if isinstance(w, Tensor) else torch.as_tensor(
        np.asarray(w), dtype=torch.float64)


def _two_model_classes(names: Sequence[str], values: np.ndarray, spec: EvalSpec, convention: str
                       ) -> tuple[np.ndarray, dict]:
    lo_b, hi_b = shared_band(spec)
    below, above = spec.specific_below, spec.specific_above
    v = np.nan_to_num(values, nan=-1.0)  # zero decoders match no rule (set dead by the caller)
    classes = np.full(len(v), OTHER, dtype=object)
    classes[(v >= lo_b) & (v <= hi_b)] = SHARED
    if convention == DELTA:
        a_only, b_only = (v <= below) & (v >= 0), v >= above
        rule = f"{only(names[0])}: delta <= {below}; {only(names[1])}: delta >= {above}"
    else:
        a_only, b_only = (v < below) & (v >= 0), v > above
        rule = f"{only(names[0])}: r < {below}; {only(names[1])}: r > {above}"
    classes[a_only] = only(names[0])
    classes[b_only] = only(names[1])
    thresholds = {"convention": convention, "rule": f"{rule}; {SHARED}: {lo_b} <= {convention} <= {hi_b}",
                  "formula": FORMULAS[convention], "specific_below": below, "specific_above": above,
                  "shared_band": [lo_b, hi_b]}
    return classes, thresholds


def decoder_norm_analysis(W_dec: Tensor | np.ndarray, model_names: Sequence[str] | None = None,
                          spec: EvalSpec | None = None, *, dead: np.ndarray | Tensor | None = None,
                          dead_definition: str | None = None, block: int = 8192) -> NormAnalysis:
    """Norms, shares, classes and cosines of W_dec [n_latents, n_models, d_model] (n_models >= 2).

    Thresholds and the two-model convention come from `spec` (default EvalSpec()); the rules are in
    the module docstring. `dead` [n_latents] bool marks latents to class as dead (left out of the
    other classes and the histograms), `dead_definition` says what it means (stored in outputs).
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
    zero = ~(total > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = norms / total[:, None]
    shares[zero] = np.nan
    if n == 2:
        convention = spec.relative_norm
        fn = relative_norm_delta if convention == DELTA else relative_norm_r
        classes, thresholds = _two_model_classes(names, fn(norms[:, 0], norms[:, 1]), spec, convention)
    else:
        convention = R
        lo_b, hi_b = shared_band(spec)
        floor = 2.0 / n * min(lo_b, 1.0 - hi_b)
        s = np.nan_to_num(shares, nan=-1.0)
        classes = np.full(m, OTHER, dtype=object)
        classes[np.all(s >= floor, axis=1)] = SHARED
        top = s.argmax(1)
        specific = s.max(1) > spec.specific_above
        classes[specific] = np.array([only(x) for x in names], dtype=object)[top[specific]]
        thresholds = {"convention": "share", "rule": "share s_i = |d_i| / sum_k |d_k|",
                      "specific_above": spec.specific_above, "shared_min_share": floor}
    marked = zero.copy()
    definition = ZERO_DECODER
    if dead is not None:
        mask = np.asarray(dead.cpu() if isinstance(dead, Tensor) else dead, dtype=bool).reshape(-1)
        if mask.shape != (m,):
            raise ValueError(f"dead mask has {mask.size} entries for {m} latents")
        marked |= mask
        definition = f"{dead_definition or 'marked dead by the caller'}; or {ZERO_DECODER}"
    classes[marked] = DEAD
    return NormAnalysis(names, norms, shares, classes.astype(str), cosine, thresholds, convention, marked,
                        definition)


def norm_table(a: NormAnalysis, dead_mask: np.ndarray | None, silent: np.ndarray | None
               ) -> tuple[list[str], list[list]]:
    """Every latent as a row: decoder norms, both relative norms (two models; `relative_norm_r`,
    `relative_norm_delta`) or the shares, decoder cosine, class (`class_by_<convention>`), and the
    dead flags: `dead_training` (1/0; empty when the dictionary records no training activity),
    `silent_on_eval` (1/0; empty when not given), `excluded_as_dead` (1/0: class "dead")."""
    names = a.model_names
    header = ["latent"] + [f"decoder_norm_{n}" for n in names]
    header += [COLUMNS[R], COLUMNS[DELTA]] if a.n_models == 2 else [f"share_{n}" for n in names]
    header += ["decoder_cosine", f"class_by_{a.thresholds.get('convention', 'share')}", "dead_training",
               "silent_on_eval", "excluded_as_dead"]
    values = [a.relative, a.delta] if a.n_models == 2 else [a.shares[:, i] for i in range(a.n_models)]
    rows = []
    for j in range(a.n_latents):
        row = [j] + [f"{a.norms[j, i]:.6g}" for i in range(a.n_models)] + [f"{v[j]:.6g}" for v in values]
        row += [f"{a.cosine[j]:.6g}", a.classes[j], "" if dead_mask is None else int(dead_mask[j]),
                "" if silent is None else int(silent[j]), int(a.dead[j])]
        rows.append(row)
    return header, rows


def rank_specific(a: NormAnalysis, top: int) -> dict[int, np.ndarray]:
    """Per model i: the `top` live latents whose largest share is model i's, most specific first
    (two models: by |r - 0.5| descending, split by the side of 0.5). Dead latents are left out."""
    spec, fav = a.specificity, a.favoured
    out = {}
    for i in range(a.n_models):
        ids = np.flatnonzero(fav == i)
        order = np.argsort(-spec[ids], kind="stable")
        out[i] = ids[order][:top]
    return out
