"""Latent Scaling (Minder et al. 2025): is a crosscoder latent that looks specific to the
fine-tuned model really absent from the base model?

A latent's decoder norm says whether the crosscoder *uses* it for a model, not whether the model
*has* it: an L1 crosscoder can zero a base decoder row for a concept both models hold (complete
shrinkage), or reconstruct the base model's copy of it with other latents (latent decoupling).
Latent Scaling asks the activations. With d_j the fine-tuned model's decoder row of latent j and
f_j its codes on N tokens, the least-squares scale of f_j d_j fitting a target y is

    beta_j(y) = d_j . sum_n f_j(x_n) y_n  /  (sum_n f_j(x_n)^2 ||d_j||^2)

for two targets per model M: its reconstruction error with latent j's own contribution added back,
x_M - (x_hat_M - f_j d_j^M), and its reconstruction x_hat_M (decoder bias included). Then

    nu_epsilon = beta(base error) / beta(ft error)      high: complete shrinkage
    nu_r       = beta(base recon) / beta(ft recon)      high: latent decoupling

and a latent exclusive to the fine-tuned model (Minder's Delta >= exclusive_delta) is `genuine`
when nu_epsilon < nu_epsilon_max and nu_r < nu_r_max (0.9, 0.2, 0.5: the paper's figure), else
`shrinkage`, `decoupling` or `shrinkage+decoupling`; `inactive` when it fired on fewer than
min_active_tokens scanned tokens, `undefined` when beta(ft) <= 0 leaves a ratio meaningless.
Other latents get Delta's classes (`<base>-only`, `shared`, `other`, `dead`).
Delta = ((|d_ft| - |d_base|) / max(|d_base|, |d_ft|) + 1) / 2 (the diffing toolkit stores 1 - Delta);
the CSV also has Anthropic's relative norm r = |d_ft| / (|d_base| + |d_ft|).

Every latent at once, in one streaming pass over stored validation rows (normalized units, position
0 skipped unless the dictionary was trained on it): per batch, d_j . e_n for all latents is one
[batch, latents] matmul e @ D^T, weighted by f (zero where a latent is silent) and summed over the
batch; adding latent j back is the closed form f_j (d_j . d_j^M) times sum f_j^2. Memory is one
batch whatever the number of rows.

With more than two models, a role left unset takes every model: all ordered pairs (base, ft).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.records import atomic_write_json
from trainer.trained import open_trained

from .activations import store_batches
from .analysis_specs import LatentScalingSpec
from .decoder_norms import DEAD, OTHER, SHARED, only
from .latent_scaling_files import write_scaling_csv, write_scaling_plot

GENUINE, SHRINKAGE, DECOUPLING, BOTH = "genuine", "shrinkage", "decoupling", "shrinkage+decoupling"
INACTIVE, UNDEFINED = "inactive", "undefined"
EXCLUSIVE_CLASSES = (GENUINE, SHRINKAGE, DECOUPLING, BOTH, INACTIVE, UNDEFINED)
_BATCH_ELEMENTS = 1 << 24  # batch rows x latents per step (64 MiB of float32 codes)


def resolve_pairs(models: Sequence[str], spec: LatentScalingSpec) -> list[tuple[int, int]]:
    """(base, ft) model indices: the spec's roles; unset with two models, the first and the
    second; unset with more, every model (every ordered pair of different models)."""
    names = list(models)
    for key in ("base", "ft"):
        v = getattr(spec, key)
        if v is not None and v not in names:
            raise ValueError(f"latent_scaling.{key} = {v!r} is not one of the dictionary's models {names}")
    if len(names) == 2:
        b = names.index(spec.base) if spec.base else (1 - names.index(spec.ft) if spec.ft else 0)
        t = names.index(spec.ft) if spec.ft else 1 - b
        return [(b, t)]
    bases = [names.index(spec.base)] if spec.base else range(len(names))
    fts = [names.index(spec.ft)] if spec.ft else range(len(names))
    return [(b, t) for b in bases for t in fts if b != t]


class ScalingSums:
    """Per-latent sums of one pass, in float64: sum f^2, tokens fired, and for every decoder the
    pairs read (`readers`: the ft models) and every model M, sum_n f_n (d . e_n^M) and
    sum_n f_n (d . x_hat_n^M)."""

    def __init__(self, dictionary, readers: Sequence[int], device):
        n, m = dictionary.n_models, dictionary.n_latents
        self.dictionary, self.readers = dictionary, list(readers)
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.ff, self.active = z(m), z(m)
        self.err, self.rec = z(len(self.readers), n, m), z(len(self.readers), n, m)
        self.n_tokens = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """x: [batch, n_models, d_model] normalized activations of the same tokens in every model."""
        d = self.dictionary
        x = x.to(d.W_dec.device, torch.float32)
        f = d.encode(x)
        x_hat = d.decode(f)
        e = x - x_hat
        self.ff += (f * f).sum(0, dtype=torch.float64)
        self.active += (f > 0).sum(0, dtype=torch.float64)
        for i, t in enumerate(self.readers):
            dec = d.W_dec[:, t].float()  # [latents, d_model]
            for m in range(d.n_models):
                self.err[i, m] += (f * (e[:, m] @ dec.T)).sum(0, dtype=torch.float64)
                self.rec[i, m] += (f * (x_hat[:, m] @ dec.T)).sum(0, dtype=torch.float64)
        self.n_tokens += x.shape[0]


@dataclass
class PairScaling:
    """Latent Scaling of every latent for one (base, ft) pair; arrays are [n_latents]."""

    base: str
    ft: str
    beta_error_base: np.ndarray
    beta_error_ft: np.ndarray
    beta_recon_base: np.ndarray
    beta_recon_ft: np.ndarray
    nu_epsilon: np.ndarray  # NaN where undefined (silent latent, or beta(ft) <= 0)
    nu_r: np.ndarray
    norm_base: np.ndarray
    norm_ft: np.ndarray
    relative: np.ndarray  # r = |d_ft| / (|d_base| + |d_ft|)
    delta: np.ndarray  # Minder's Delta
    active: np.ndarray  # tokens the latent fired on
    classes: np.ndarray  # str

    @property
    def counts(self) -> dict[str, int]:
        names = list(EXCLUSIVE_CLASSES) + [only(self.base), SHARED, OTHER, DEAD]
        return {c: int((self.classes == c).sum()) for c in names}

    def ids(self, cls: str) -> np.ndarray:
        return np.flatnonzero(self.classes == cls)


@dataclass
class ScalingResult:
    models: list[str]
    n_tokens: int
    pairs: list[PairScaling]
    thresholds: dict


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den where den > 0, else NaN (a beta with no firing token, a nu with beta(ft) <= 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def delta_and_relative(norm_base: np.ndarray, norm_ft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minder's Delta and Anthropic's r from the two decoder norms (NaN where both are zero)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = 0.5 * ((norm_ft - norm_base) / np.maximum(norm_base, norm_ft) + 1.0)
        rel = norm_ft / (norm_base + norm_ft)
    return delta, rel


def classify(p: PairScaling, spec: LatentScalingSpec) -> np.ndarray:
    """The classes of the module docstring, from Delta, the nus and the firing counts."""
    delta = np.nan_to_num(p.delta, nan=-1.0)
    lo, hi = spec.shared_delta
    out = np.full(delta.shape, OTHER, dtype=object)
    out[(delta >= lo) & (delta <= hi)] = SHARED
    out[(delta <= 1.0 - spec.exclusive_delta) & (delta >= 0)] = only(p.base)
    exclusive = delta >= spec.exclusive_delta
    high_e, high_r = p.nu_epsilon >= spec.nu_epsilon_max, p.nu_r >= spec.nu_r_max
    ex = np.where(high_e & high_r, BOTH, np.where(high_e, SHRINKAGE, np.where(high_r, DECOUPLING, GENUINE)))
    ex = np.where(np.isnan(p.nu_epsilon) | np.isnan(p.nu_r), UNDEFINED, ex)
    ex = np.where(p.active < spec.min_active_tokens, INACTIVE, ex)
    out[exclusive] = ex[exclusive]
    out[np.isnan(p.delta)] = DEAD
    return out.astype(str)


def scaling_from_sums(sums: ScalingSums, models: Sequence[str], pairs: Sequence[tuple[int, int]],
                      spec: LatentScalingSpec) -> ScalingResult:
    """The betas, nus and classes of every pair from one pass's sums."""
    w = sums.dictionary.W_dec.detach().to("cpu", torch.float64)  # [latents, models, d]
    norms = w.norm(dim=-1).numpy()
    ff, active = sums.ff.cpu().numpy(), sums.active.cpu().numpy()
    err, rec = sums.err.cpu().numpy(), sums.rec.cpu().numpy()
    out = []
    for b, t in pairs:
        i = sums.readers.index(t)
        own = (w[:, t] * w[:, t]).sum(-1).numpy()  # |d_j|^2
        denom = ff * own
        # error target with latent j added back: d_j . (e + f_j d_j^M) summed = err + ff * (d_j . d_j^M)
        beta = {key: _ratio(err[i, m] + ff * (w[:, t] * w[:, m]).sum(-1).numpy(), denom)
                for key, m in (("error_base", b), ("error_ft", t))}
        beta.update({key: _ratio(rec[i, m], denom) for key, m in (("recon_base", b), ("recon_ft", t))})
        delta, rel = delta_and_relative(norms[:, b], norms[:, t])
        p = PairScaling(models[b], models[t], beta["error_base"], beta["error_ft"], beta["recon_base"],
                        beta["recon_ft"], _ratio(beta["error_base"], beta["error_ft"]),
                        _ratio(beta["recon_base"], beta["recon_ft"]), norms[:, b], norms[:, t], rel, delta,
                        active, np.array([], dtype=str))
        p.classes = classify(p, spec)
        out.append(p)
    thresholds = {"exclusive": f"Delta >= {spec.exclusive_delta}", "shared": f"Delta in {list(spec.shared_delta)}",
                  "genuine": f"nu_epsilon < {spec.nu_epsilon_max} and nu_r < {spec.nu_r_max}",
                  "min_active_tokens": spec.min_active_tokens}
    return ScalingResult(list(models), sums.n_tokens, out, thresholds)


def latent_scaling(dictionary, batches: Iterable[Tensor], models: Sequence[str],
                   spec: LatentScalingSpec | None = None) -> ScalingResult:
    """Latent Scaling of a crosscoder over batches [rows, n_models, d_model] of normalized
    activations (in-memory or streamed); the dictionary is put in eval mode."""
    spec = spec or LatentScalingSpec()
    if dictionary.n_models < 2:
        raise ValueError("Latent Scaling needs a crosscoder (two or more models); this dictionary is an SAE")
    if len(models) != dictionary.n_models:
        raise ValueError(f"{len(models)} model names for a {dictionary.n_models}-model crosscoder")
    dictionary.eval()
    pairs = resolve_pairs(models, spec)
    sums = ScalingSums(dictionary, sorted({t for _, t in pairs}), dictionary.W_dec.device)
    for x in batches:
        if x.shape[0]:
            sums.add(x)
    return scaling_from_sums(sums, models, pairs, spec)


def _stored_rows(trained, spec: LatentScalingSpec, batch_rows: int, progress: bool) -> Iterator[Tensor]:
    """[rows, n_models, d] batches of the first spec.max_rows validation rows (fewer if the split is)."""
    ts = trained.token_set
    ctx, first = ts.context_length, ts.n_train_sequences
    skip = not trained.include_first_position
    per_seq = ctx - 1 if skip else ctx
    n_seq = min(ts.n_sequences - first, math.ceil(spec.max_rows / per_seq))
    if n_seq <= 0:
        raise ValueError(f"token set {ts.id} has no validation sequences to scan")
    tokens = np.asarray(ts.tokens[first:first + n_seq])
    left = spec.max_rows
    for batch in store_batches(trained.arrays, tokens, first * ctx, batch_rows=batch_rows,
                               include_first_position=not skip, progress=progress):
        x = torch.stack(batch.inputs, dim=1)[:left]
        left -= x.shape[0]
        yield x
        if left <= 0:
            return


def run_latent_scaling(dict_dir: str | Path, cfg, spec: LatentScalingSpec | None, out_dir: str | Path, *,
                       device: str | torch.device | None = None, progress: bool = True,
                       log: Callable[..., None] | None = None) -> dict:
    """Latent Scaling of the crosscoder in `dict_dir` on its experiment's validation rows.

    Writes latent_scaling.csv (one row per latent and pair), latent_scaling.json (the summary and
    every latent's values) and latent_scaling.png (nu_epsilon against nu_r of the exclusive
    latents); returns the summary.
    """
    from pipeline import models as M

    spec = spec or LatentScalingSpec()
    log = log or (lambda *_: None)
    dev = M.resolve_device(device if device is not None else spec.device)
    trained = open_trained(dict_dir, cfg, device=dev)
    d = trained.dictionary
    if d.n_models < 2:
        raise ValueError(f"{dict_dir} is an SAE: Latent Scaling compares a crosscoder's models")
    batch_rows = spec.batch_rows or max(256, min(16384, _BATCH_ELEMENTS // d.n_latents))
    result = latent_scaling(d, _stored_rows(trained, spec, batch_rows, progress), trained.models, spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"dictionary": trained.name, "dict_dir": str(dict_dir), "models": result.models,
               "hook": trained.meta["hook"], "tokenset_id": trained.token_set.id, "n_tokens": result.n_tokens,
               "units": "normalized activations (the store's)", "thresholds": result.thresholds,
               "first_position_included": trained.include_first_position,
               "pairs": [pair_summary(p) for p in result.pairs],
               "files": {"csv": "latent_scaling.csv", "json": "latent_scaling.json", "png": "latent_scaling.png"}}
    write_scaling_csv(out / "latent_scaling.csv", result.pairs)
    write_scaling_plot(out / "latent_scaling.png", result.pairs, spec, title=trained.name)
    atomic_write_json(out / "latent_scaling.json", {**summary, "latents": [pair_arrays(p) for p in result.pairs]})
    for p in summary["pairs"]:
        log(f"{trained.name}: latent scaling {p['base']} -> {p['ft']} on {result.n_tokens} tokens: "
            + ", ".join(f"{k} {v}" for k, v in p["counts"].items() if v))
    return summary


def _median(a: np.ndarray) -> float | None:
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else None


def pair_summary(p: PairScaling) -> dict:
    """Counts per class, the exclusive latents by class, and median nus (exclusive vs shared)."""
    exclusive = np.isin(p.classes, EXCLUSIVE_CLASSES)
    shared = p.classes == SHARED
    return {"base": p.base, "ft": p.ft, "counts": p.counts,
            "exclusive": {c: [int(j) for j in p.ids(c)] for c in EXCLUSIVE_CLASSES if p.ids(c).size},
            "median_nu_epsilon": {"exclusive": _median(p.nu_epsilon[exclusive]), "shared": _median(p.nu_epsilon[shared])},
            "median_nu_r": {"exclusive": _median(p.nu_r[exclusive]), "shared": _median(p.nu_r[shared])}}


PAIR_FIELDS = ("nu_epsilon", "nu_r", "beta_error_base", "beta_error_ft", "beta_recon_base", "beta_recon_ft",
               "relative", "delta", "norm_base", "norm_ft", "active")


def pair_arrays(p: PairScaling) -> dict:
    """Every latent's values, column-wise (NaN becomes null in the JSON)."""
    return {"base": p.base, "ft": p.ft, "class": p.classes.tolist(),
            **{k: [float(v) for v in getattr(p, k)] for k in PAIR_FIELDS}}
