"""What differs between the models, latent by latent, for the browser's pages and index.

Decoder norms per model (normalized units, as trained), both relative-norm conventions for two
models (r = |d_B| / (|d_A| + |d_B|); Minder et al.'s delta = 1/2 ((|d_B| - |d_A|) / max + 1)),
the decoder cosine and the class of evals.decoder_norms; each model's share for n models. An SAE
has one decoder: its class is only live / dead. Dead latents come from training's record
(`TrainedDictionary.dead_mask()`, when the folder has one). Latent Scaling's nu values come from an
optional CSV beside the evaluation (columns latent, nu_epsilon, nu_r, class; optionally base and
ft naming the pair), shown only when present.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evals.config import EvalSpec

SCALING_FILE = "latent_scaling.csv"
SCALING_COLUMNS = ("latent", "nu_epsilon", "nu_r", "class")


class LatentScalingFileError(ValueError):
    """latent_scaling.csv cannot be read as per-latent nu values."""


@dataclass
class Scaling:
    """Latent Scaling of one (base, fine-tuned) pair: NaN / "" where a latent has no row."""

    pair: str  # "ft vs base", or "" when the file names no pair
    nu_epsilon: np.ndarray
    nu_r: np.ndarray
    classes: np.ndarray  # str


@dataclass
class DiffStats:
    models: list[str]
    norms: np.ndarray  # [L, n_models]
    classes: np.ndarray  # [L] str
    class_names: list[str]
    dead: np.ndarray  # [L] bool (all False when training recorded no mask)
    dead_known: bool
    r: np.ndarray | None = None  # [L], two models
    delta: np.ndarray | None = None
    cosine: np.ndarray | None = None
    shares: np.ndarray | None = None  # [L, n] crosscoders
    scaling: list[Scaling] = field(default_factory=list)


def dead_mask(trained, n_latents: int) -> np.ndarray | None:
    """Training's dead-latent mask, if the folder records one (and the class offers it)."""
    get = getattr(trained, "dead_mask", None)
    mask = get() if callable(get) else None
    if mask is None:
        return None
    mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool).reshape(-1)
    if mask.shape != (n_latents,):
        raise ValueError(f"dead mask of shape {mask.shape} for {n_latents} latents")
    return mask


def diff_stats(W_dec: torch.Tensor, models: list[str], spec: EvalSpec | None, dead: np.ndarray | None) -> DiffStats:
    """Per-latent decoder statistics of a crosscoder (n >= 2 models) or an SAE."""
    L, n, _ = W_dec.shape
    norms = W_dec.detach().float().norm(dim=-1).cpu().numpy().astype(np.float64)
    known = dead is not None
    dead = np.zeros(L, bool) if dead is None else np.asarray(dead, bool)
    if n == 1:
        classes = np.where(dead, "dead", "live").astype(object)
        return DiffStats(list(models), norms, classes, ["live", "dead"], dead, known)
    from evals.decoder_norms import decoder_norm_analysis

    a = decoder_norm_analysis(W_dec, models, spec or EvalSpec(), dead=dead if known else None,
                              dead_definition="dead in training" if known else None)
    out = DiffStats(list(models), norms, np.asarray(a.classes, dtype=object), list(a.class_names),
                    np.asarray(a.dead, bool), known, cosine=np.asarray(a.cosine, np.float64),
                    shares=np.asarray(a.shares, np.float64))
    if n == 2:
        na, nb = norms[:, 0], norms[:, 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            out.r = nb / (na + nb)
            out.delta = 0.5 * ((nb - na) / np.maximum(na, nb) + 1)
    return out


def _float(text: str, path: Path, line: int, column: str) -> float:
    try:
        return float(text) if text.strip() not in ("", "nan", "NaN") else math.nan
    except ValueError:
        raise LatentScalingFileError(f"{path}:{line}: {column} = {text!r} is not a number; "
                                     "write a number or leave it empty") from None


def read_latent_scaling(path: str | Path, n_latents: int) -> list[Scaling]:
    """The nu values of `path` (one Scaling per base/ft pair); [] when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in SCALING_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise LatentScalingFileError(f"{path} lacks the column(s) {missing} (it has {reader.fieldnames}); "
                                         f"write a header with {', '.join(SCALING_COLUMNS)}")
        pairs: dict[str, Scaling] = {}
        for line, rec in enumerate(reader, start=2):
            pair = f"{rec['ft']} vs {rec['base']}" if rec.get("base") and rec.get("ft") else ""
            s = pairs.get(pair)
            if s is None:
                s = pairs[pair] = Scaling(pair, np.full(n_latents, np.nan), np.full(n_latents, np.nan),
                                          np.full(n_latents, "", dtype=object))
            try:
                j = int(rec["latent"])
            except ValueError:
                raise LatentScalingFileError(f"{path}:{line}: latent = {rec['latent']!r} is not an integer") from None
            if not 0 <= j < n_latents:
                raise LatentScalingFileError(f"{path}:{line}: latent {j} is outside 0..{n_latents - 1}: the file "
                                             "belongs to another dictionary")
            s.nu_epsilon[j] = _float(rec["nu_epsilon"], path, line, "nu_epsilon")
            s.nu_r[j] = _float(rec["nu_r"], path, line, "nu_r")
            s.classes[j] = rec["class"] or ""
    return list(pairs.values())
