"""Context windows: which tokens are shown around an activation, and when two are the same.

A window is the `before` tokens before a row's token, the token, and the `after` tokens after it,
cut at the ends of its sequence (windows never cross into another sequence). Two rows whose
windows hold the same tokens would be shown identically, so they share a *context key*: a 64-bit
hash of the window's token ids (position by position, with a marker where the window is cut).
"""

from __future__ import annotations

import numpy as np

_MULT_SEED = 0x6D64696666  # fixed: keys are comparable between runs


def _multipliers(width: int) -> np.ndarray:
    rng = np.random.default_rng(_MULT_SEED)
    return rng.integers(1, 2**62, size=width, dtype=np.int64) | 1  # odd: invertible mod 2^64


def context_keys(tokens: np.ndarray, before: int, after: int) -> np.ndarray:
    """[n_seq * ctx] int64 key of every row's window; `tokens` [n_seq, ctx] token ids (>= 0)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n_seq, ctx = tokens.shape
    width = before + after + 1
    mult = _multipliers(width)
    key = np.zeros((n_seq, ctx), dtype=np.int64)
    with np.errstate(over="ignore"):
        for i, o in enumerate(range(-before, after + 1)):
            shifted = np.zeros((n_seq, ctx), dtype=np.int64)  # 0: outside the sequence
            lo, hi = max(0, -o), min(ctx, ctx - o)
            if hi > lo:
                shifted[:, lo:hi] = tokens[:, lo + o:hi + o] + 1
            key = key * np.int64(31) + shifted * mult[i]
    return key.reshape(-1)


def window_rows(rows: np.ndarray, ctx: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [n, width] of each window, -1 outside the sequence; index of the centre row: before)."""
    rows = np.asarray(rows, dtype=np.int64)
    offsets = np.arange(-before, after + 1, dtype=np.int64)
    pos = rows % ctx
    out = rows[:, None] + offsets[None, :]
    inside = (pos[:, None] + offsets[None, :] >= 0) & (pos[:, None] + offsets[None, :] < ctx)
    return np.where(inside, out, -1), np.full(len(rows), before, dtype=np.int64)

