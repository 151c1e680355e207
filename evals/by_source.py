"""Which token source each class of crosscoder latents fires on.

A narrow fine-tune is a model diff whose answer we know: the fine-tuned model changed on its
fine-tuning domain. If a crosscoder's latents specific to the fine-tuned model (relative decoder
norm near its end; `evals.decoder_norms`) capture that change, they should fire more often on text
of that domain than on other text, and more so than the shared latents do. This module measures
that.

For latent j and two sources a, b (validation tokens only, position 0 skipped), with f_j(s) its
firing frequency on the tokens of source s, the *preference* for a is

    p_j = f_j(a) / (f_j(a) + f_j(b))       0.5 = no preference, 1 = fires only on a

Frequencies are per token of each source, so unequal source sizes do not bias p. A class of
latents prefers a when its mean p is above the shared latents' mean p (the baseline: shared
latents describe what both models do on both texts).

Two tests answer the question, the first that can:

- *exclusive*: enough latents are specific to the model (relative norm past `specific_above`):
  their mean p against the baseline.
- *leaning*: otherwise. A crosscoder trained for minutes rarely pushes any relative norm near 0
  or 1 (on the demo's pair every one stayed within 0.39-0.62), yet the order of the norms still
  carries the diff. The `top` live latents whose decoder leans most toward the model must prefer
  a by the margin over both the baseline and the `top` leaning most toward the other model (the
  control), and the rank correlation of lean and p must beat a permutation test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline import store as S

from .activations import store_batches
from .decoder_norms import NormAnalysis


@dataclass
class ClassPreference:
    """How one class of latents splits its firing between source a and source b."""

    name: str
    n_latents: int  # latents of the class that fired on a or b
    mean_preference: float  # mean p_j over those latents (NaN if none)
    prefer_a: int  # how many of them have p_j > 0.5
    freq_a: float  # mean firing frequency on a
    freq_b: float  # ... and on b


def source_preference(freq_a: np.ndarray, freq_b: np.ndarray) -> np.ndarray:
    """[n_latents] p_j = f(a) / (f(a) + f(b)); NaN for latents that fire on neither."""
    fa, fb = np.asarray(freq_a, np.float64), np.asarray(freq_b, np.float64)
    total = fa + fb
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, fa / np.where(total > 0, total, 1.0), np.nan)


def class_preference(name: str, ids: np.ndarray, pref: np.ndarray, freq_a: np.ndarray,
                     freq_b: np.ndarray) -> ClassPreference:
    ids = np.asarray(ids, np.int64)
    live = ids[np.isfinite(pref[ids])]
    if live.size == 0:
        return ClassPreference(name, 0, math.nan, 0, math.nan, math.nan)
    p = pref[live]
    return ClassPreference(name, int(live.size), float(p.mean()), int((p > 0.5).sum()),
                           float(np.mean(freq_a[live])), float(np.mean(freq_b[live])))


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties given their average rank."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v))
    _, inverse = np.unique(v, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties) over the pairs where both are finite; NaN with
    fewer than 3 pairs or a constant side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return math.nan
    rx, ry = _ranks(x[ok]), _ranks(y[ok])
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else math.nan


@dataclass
class SourceCheck:
    """The answer, with the numbers behind it."""

    dictionary: str
    sources: tuple[str, str]  # (a, b): a is the fine-tuning domain
    specific: ClassPreference  # latents specific to the model of interest
    shared: ClassPreference  # the baseline
    other_specific: ClassPreference  # latents specific to the other model (a control)
    top_by_norm: ClassPreference  # the `top` live latents nearest the model's end, whatever the class
    bottom_by_norm: ClassPreference  # the `top` live latents nearest the other model's end (control)
    rho: float  # Spearman correlation of the model's decoder-norm share with p, live latents
    rho_p: float  # one-sided permutation p-value of rho (shares shuffled over the live latents)
    tokens: tuple[int, int]  # validation tokens scanned per source
    test: str  # "exclusive" or "leaning": which test answered (module docstring)
    holds: bool | None  # True / False; None: too few live latents to tell
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def permutation_p(x: np.ndarray, y: np.ndarray, observed: float, *, n: int = 999, seed: int = 0) -> float:
    """One-sided p-value of a rank correlation at least `observed` when x is shuffled over the
    pairs where both are finite: (1 + #{null >= observed}) / (1 + n). Seeded: the same every run."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or not np.isfinite(observed):
        return math.nan
    rng = np.random.default_rng(seed)
    xs, ys = x[ok], y[ok]
    beats = sum(rank_correlation(rng.permutation(xs), ys) >= observed for _ in range(n))
    return (1 + beats) / (1 + n)


def check_source_preference(a: NormAnalysis, model: int, freq_a: np.ndarray, freq_b: np.ndarray, *,
                            sources: tuple[str, str], tokens: tuple[int, int], dictionary: str = "",
                            margin: float = 0.1, min_latents: int = 5, top: int = 20,
                            alpha: float = 0.01) -> SourceCheck:
    """Do the latents specific to model `model` (index into a.model_names) prefer source a?

    With at least `min_latents` specific latents that fired, the exclusive test: it holds when
    their mean preference is at least `margin` above the shared latents' and above 0.5. With fewer,
    the leaning test (module docstring), at significance `alpha`. None when fewer than `top`
    latents fired at all. A two-model analysis is expected.
    """
    if a.n_models != 2:
        raise ValueError(f"the source check compares two models; this analysis has {a.n_models}")
    pref = source_preference(freq_a, freq_b)
    name, other = a.model_names[model], a.model_names[1 - model]
    share = a.shares[:, model]
    specific = class_preference(f"{name}-only", a.ids(f"{name}-only"), pref, freq_a, freq_b)
    shared = class_preference("shared", a.ids("shared"), pref, freq_a, freq_b)
    control = class_preference(f"{other}-only", a.ids(f"{other}-only"), pref, freq_a, freq_b)
    live = np.flatnonzero(np.isfinite(pref) & np.isfinite(share))
    order = live[np.argsort(-share[live], kind="stable")]
    nearest, farthest = order[:top], order[::-1][:top]
    top_group = class_preference(f"top {len(nearest)} by {name} share", nearest, pref, freq_a, freq_b)
    bottom_group = class_preference(f"top {len(farthest)} by {other} share", farthest, pref, freq_a, freq_b)
    rho = rank_correlation(share, pref)
    rho_p = permutation_p(share, pref, rho)
    base = shared.mean_preference if shared.n_latents else 0.5
    if specific.n_latents >= min_latents:
        test, m = "exclusive", specific.mean_preference
        if m >= base + margin and m > 0.5:
            holds, reason = True, (f"{specific.n_latents} {name}-only latents fire on {sources[0]} with mean "
                                   f"preference {m:.2f}, vs {base:.2f} for shared latents")
        else:
            holds, reason = False, (f"{specific.n_latents} {name}-only latents have mean preference {m:.2f} "
                                    f"for {sources[0]}, vs {base:.2f} for shared latents: not above by {margin}")
    elif len(live) < 2 * top:
        test, holds, reason = "leaning", None, (f"only {len(live)} latents fired on the validation tokens; "
                                                f"the leaning test needs {2 * top}: no answer")
    else:
        test, m, c = "leaning", top_group.mean_preference, bottom_group.mean_preference
        lead = (f"{specific.n_latents} latent(s) specific to {name} fired (need {min_latents}); the {top} "
                f"leaning most toward {name} have mean preference {m:.2f} for {sources[0]}, vs {base:.2f} for "
                f"shared latents and {c:.2f} for the {top} leaning toward {other}; rank correlation "
                f"{rho:.2f} (permutation p = {rho_p:.3f})")
        holds = bool(m >= base + margin and m >= c + margin and m > 0.5 and rho > 0 and rho_p < alpha)
        reason = lead + ("" if holds else f": not above both by {margin} with p < {alpha}")
    return SourceCheck(dictionary, sources, specific, shared, control, top_group, bottom_group, rho, rho_p,
                       tokens, test, holds, reason)


@torch.no_grad()
def validation_frequencies(dictionary, arrays: list[S.ActivationArray], token_set: S.TokenSet,
                           source_a: int, source_b: int, *, include_first_position: bool = False,
                           max_rows: int | None = 262_144, batch_rows: int = 8192, device="cpu",
                           progress: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Per-latent firing frequency of a crosscoder on the validation tokens of two sources.

    Streams the first `max_rows` validation rows (None: the whole split; memory is one batch).
    Returns (freq on a, freq on b, (tokens of a, tokens of b)). Reads only the validation split.
    """
    ctx = token_set.context_length
    first = token_set.n_train_sequences
    n_seq = token_set.n_sequences - first
    if max_rows is not None:
        n_seq = min(n_seq, -(-max_rows // ctx))
    if n_seq <= 0:
        raise ValueError(f"token set {token_set.id} has no validation sequences")
    labels = torch.as_tensor(np.asarray(token_set.source[first:first + n_seq], dtype=np.int64))
    fired = torch.zeros(2, dictionary.n_latents, dtype=torch.float64)
    tokens = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in store_batches(arrays, np.asarray(token_set.tokens[first:first + n_seq]), first * ctx,
                                   batch_rows=batch_rows, include_first_position=include_first_position,
                                   progress=progress):
            label = labels[batch.rows // ctx]
            f = dictionary.encode(torch.stack([x.to(device) for x in batch.inputs], 1)).cpu()
            for i, src in enumerate((source_a, source_b)):
                sel = label == src
                tokens[i] += sel.sum()
                fired[i] += (f[sel] > 0).sum(0)
    for i, src in enumerate((source_a, source_b)):
        if tokens[i] == 0:
            raise ValueError(f"token set {token_set.id} has no validation tokens from source {src}")
    freq = (fired / tokens[:, None]).numpy()
    return freq[0], freq[1], (int(tokens[0]), int(tokens[1]))


def source_names(attrs: dict) -> list[str]:
    """Readable names of a token set's sources: the dataset name or the files' base names."""
    out = []
    for i, d in enumerate(attrs.get("sources") or []):
        files = [f[0] for f in d.get("files") or [] if isinstance(f, list) and f]
        name = d.get("name") or ", ".join(files[:2]) + (" ..." if len(files) > 2 else "") or f"source {i}"
        out.append(name if name not in out else f"{name} ({i})")
    return out
