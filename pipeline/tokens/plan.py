"""The sizes of a token set, from its spec alone: how many sequences, from which source, in what order.

``n_sequences = n_tokens // context_length`` is split between sources in proportion to their
weights (largest remainder; every source with weight > 0 gets at least one sequence when there are
enough). The order is shuffled twice, so that the validation split (the LAST ``n_validation``
sequences) is a random sample of every source, not the end of its stream:

- which source: ``labels = np.repeat(arange(n_sources), counts)`` shuffled by
  ``np.random.default_rng(seed)``; position i comes from source ``labels[i]``;
- which of its sequences: the r-th position of source s holds sequence ``perm_s[r]`` of that
  source's stream (0 = its first ``context_length`` tokens), with
  ``perm_s = np.random.default_rng([seed, 1, s]).permutation(counts[s])``.

Everything here is decided before any document is read, so a bad spec fails at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from pipeline.config import TokenSpec
from pipeline.tokens.errors import source_label
from pipeline.tokens.naming import describe_sources

MAX_SOURCES = 256  # source labels are stored as uint8


@dataclass(frozen=True)
class TokenSetPlan:
    n_sequences: int
    context_length: int
    n_tokens: int  # n_sequences * context_length (the tokens actually produced)
    n_validation: int  # the last n_validation sequences are the validation split
    n_train_sequences: int
    counts: list[int]  # sequences per source, in source order
    source_descriptions: list[dict]


def _validate_spec(spec: TokenSpec) -> None:
    problems = []
    if not spec.sources:
        problems.append("tokens.sources is empty: add at least one source")
    if len(spec.sources) > MAX_SOURCES:
        problems.append(f"tokens.sources has {len(spec.sources)} entries; at most {MAX_SOURCES} are supported")
    if not isinstance(spec.context_length, int) or spec.context_length < 2:
        problems.append(f"tokens.context_length = {spec.context_length!r}: must be an integer >= 2")
    elif not isinstance(spec.n_tokens, int) or spec.n_tokens < spec.context_length:
        problems.append(
            f"tokens.n_tokens = {spec.n_tokens!r} is less than context_length = {spec.context_length}: "
            "raise n_tokens to at least one sequence"
        )
    vf = spec.validation_fraction
    if not isinstance(vf, (int, float)) or not (0.0 <= vf < 1.0) or math.isnan(vf):
        problems.append(f"tokens.validation_fraction = {vf!r}: must be in [0, 1)")
    if not isinstance(spec.seed, int) or spec.seed < 0:
        problems.append(f"tokens.seed = {spec.seed!r}: must be a non-negative integer")
    for i, src in enumerate(spec.sources):
        where = source_label(i, src)
        w = src.weight
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            problems.append(f"{where}: weight = {w!r} must be a finite number >= 0")
        if src.kind in ("text", "jsonl", "parquet") and not src.paths:
            problems.append(f"{where}: kind {src.kind!r} needs `paths` (files or globs)")
        elif src.kind == "hf" and not src.name:
            problems.append(f"{where}: kind 'hf' needs `name` (a dataset name or local directory)")
        elif src.kind == "tokenized" and bool(src.name) == bool(src.paths):
            problems.append(
                f"{where}: kind 'tokenized' needs exactly one of `name` (a save_to_disk directory) "
                "or `paths` (jsonl/parquet files)"
            )
        elif src.kind not in ("text", "jsonl", "parquet", "hf", "tokenized"):
            problems.append(f"{where}: unknown kind {src.kind!r}; use text, jsonl, parquet, hf or tokenized")
    if spec.sources and not problems and sum(s.weight for s in spec.sources) <= 0:
        problems.append("every tokens.sources[*].weight is 0: give at least one source a positive weight")
    if problems:
        raise ValueError("invalid token spec:\n  - " + "\n  - ".join(problems))


def _allocate(n: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of n by weights (exact rational arithmetic, ties to the lower index);
    then every positive-weight source gets at least one, taken from the largest count, if n allows."""
    ws = [Fraction(w) for w in weights]
    total = sum(ws)
    quotas = [n * w / total for w in ws]
    counts = [math.floor(q) for q in quotas]
    left = n - sum(counts)
    order = sorted(range(len(ws)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    positive = [i for i, w in enumerate(ws) if w > 0]
    if n >= len(positive):
        for i in positive:
            if counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def source_order(counts: list[int], seed: int) -> np.ndarray:
    """labels[i]: the source whose next sequence is sequence i of the token set."""
    labels = np.repeat(np.arange(len(counts), dtype=np.uint8), counts)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def stream_order(labels: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """picks[i]: which sequence of source labels[i]'s stream (in stream order) is sequence i."""
    picks = np.empty(len(labels), dtype=np.int64)
    by_source = np.argsort(labels, kind="stable")  # each source's positions, in position order
    start = 0
    for s, c in enumerate(counts):
        picks[by_source[start:start + c]] = np.random.default_rng([seed, 1, s]).permutation(c)
        start += c
    return picks


def sizes(spec: TokenSpec) -> tuple[int, int, list[int]]:
    """(n_sequences, n_validation, counts) after validating the spec; reads no data."""
    _validate_spec(spec)
    L = spec.context_length
    n = spec.n_tokens // L
    n_val = 0
    if spec.validation_fraction > 0:
        n_val = max(1, round(n * spec.validation_fraction))
        if n_val >= n:
            raise ValueError(
                f"tokens.validation_fraction = {spec.validation_fraction} leaves no training sequences "
                f"({n_val} of {n} sequences of {L} tokens would be validation): raise tokens.n_tokens "
                "or lower validation_fraction"
            )
    return n, n_val, _allocate(n, [float(s.weight) for s in spec.sources])


def plan_token_set(spec: TokenSpec) -> TokenSetPlan:
    """The sizes of the token set (no tokenization; local files are hashed for the descriptions)."""
    n, n_val, counts = sizes(spec)
    return TokenSetPlan(
        n_sequences=n,
        context_length=spec.context_length,
        n_tokens=n * spec.context_length,
        n_validation=n_val,
        n_train_sequences=n - n_val,
        counts=counts,
        source_descriptions=describe_sources(spec),
    )
