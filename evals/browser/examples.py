"""Which examples each latent page shows, and every token's activation in their windows.

Per latent and column: the top activations over distinct contexts (`TopContexts`), then up to
`per_band` examples from each of `bands` activation bands, highest band first, as sae_vis does:

- `interval` bands split [0, max] into equal widths (sae_vis' "INTERVAL lo - hi, CONTAINS x%");
- `quantile` bands hold equal shares of the latent's activations (edges from its histogram).

A band's examples are drawn from the per-bin uniform samples of `BinnedSamples`, each sample
weighted by its bin's count over the bin's distinct samples (so a draw is about uniform over the
band's activations), by weighted sampling without replacement (Efraimidis-Spirakis keys, seeded).
No context is shown twice for a latent: a context already among the top activations or drawn for
another band is skipped. A band's share ("contains") is read off the histogram, linear within bins.

After the selection, only the windows of the chosen examples are read back from the store and
re-encoded (a full encode: TopK-style codes depend on every latent), in chunk-ordered spans.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import store as S

from .collect import Collection, ScanInputs, encode_column
from .spec import BrowserSpec
from .windows import window_rows

TOP = -1  # the group of top activations; bands are 0 (highest) .. bands - 1


@dataclass
class Examples:
    """Chosen examples of every (column, latent), with their windows."""

    column: np.ndarray  # [E]
    latent: np.ndarray  # [E]
    group: np.ndarray  # [E] TOP or band index (0 = highest band)
    value: np.ndarray  # [E] activation at the example's token
    row: np.ndarray  # [E] scan row
    band_edges: np.ndarray  # [columns, latents, bands + 1] ascending
    band_share: np.ndarray  # [columns, latents, bands] fraction of activations in each band (ascending)
    tokens: np.ndarray | None = None  # [E, width] token ids, -1 outside the sequence
    acts: np.ndarray | None = None  # [E, width] the latent's activation, NaN where not encoded
    center: int = 0  # index of the example's token in its window


def histogram_cdf(counts: np.ndarray, rng: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Activations below x per latent, linear within bins: counts [L, B], range [L], x [L, m]."""
    L, B = counts.shape
    width = np.where(rng > 0, rng / B, 1.0)[:, None]
    pos = np.clip(x / width, 0, B)  # in bins
    whole = np.floor(pos).astype(np.int64)
    cum = np.concatenate([np.zeros((L, 1)), np.cumsum(counts, axis=1)], axis=1)  # [L, B + 1]
    below = np.take_along_axis(cum, np.minimum(whole, B), axis=1)
    part = np.take_along_axis(np.concatenate([counts, np.zeros((L, 1))], axis=1), np.minimum(whole, B), axis=1)
    return below + (pos - whole) * part


def band_edges(kind: str, counts: np.ndarray, rng: np.ndarray, top: np.ndarray, bands: int) -> np.ndarray:
    """[L, bands + 1] ascending band edges: equal widths of [0, top], or equal shares (quantiles)."""
    L, B = counts.shape
    frac = np.linspace(0.0, 1.0, bands + 1)
    if kind == "interval":
        return top[:, None] * frac[None, :]
    # invert the piecewise-linear CDF: per latent, quantile q at the bin where the cum count crosses q
    total = counts.sum(1, keepdims=True).astype(np.float64)
    cum = np.cumsum(counts, axis=1)
    target = frac[None, :] * total
    b = np.minimum((cum[:, :, None] < target[:, None, :]).sum(1), B - 1)  # first bin reaching each q
    before = np.where(b > 0, np.take_along_axis(cum, np.maximum(b - 1, 0), axis=1), 0)
    inside = np.take_along_axis(counts, b, axis=1)
    width = (rng / B)[:, None]
    edges = (b + np.where(inside > 0, (target - before) / np.maximum(inside, 1), 0)) * width
    edges[:, 0], edges[:, -1] = 0.0, top
    return np.maximum.accumulate(np.minimum(edges, top[:, None]), axis=1)


def _draw_bands(coll: Collection, c: int, spec: BrowserSpec, seed: int) -> tuple:
    """Band examples of column c: (latent, band, value, row) arrays, band edges, band shares."""
    b = coll.bins[c]
    counts, rng, sv, sr = b["counts"], b["range"], b["sample_value"], b["sample_row"]
    L, B, Sm = sv.shape
    nb = spec.bands
    top_v, top_r = coll.top_values[c], coll.top_rows[c]
    edges = band_edges(spec.band_kind, counts, rng, top_v[:, 0], nb)
    share = np.diff(histogram_cdf(counts, rng, edges), axis=1) / np.maximum(counts.sum(1, keepdims=True), 1)
    if nb == 0:
        return (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float32), np.zeros(0, np.int64)), edges, share
    # distinct samples per bin (draws are with replacement) and their weights
    order = np.argsort(sr, axis=2, kind="stable")
    rows_sorted = np.take_along_axis(sr, order, axis=2)
    repeat = np.zeros_like(rows_sorted, dtype=bool)
    repeat[:, :, 1:] = rows_sorted[:, :, 1:] == rows_sorted[:, :, :-1]
    repeat = np.take_along_axis(repeat, np.argsort(order, axis=2), axis=2)
    keep = (sr >= 0) & ~repeat
    distinct = keep.sum(2, keepdims=True)
    weight = np.broadcast_to((counts[:, :, None] / np.maximum(distinct, 1)), sv.shape)
    lat = np.broadcast_to(np.arange(L)[:, None, None], sv.shape)[keep]
    val, row, w = sv[keep], sr[keep], weight[keep]
    inner = edges[lat, 1:nb]
    band = nb - 1 - (val[:, None] >= inner).sum(1)  # 0 = highest band
    u = np.random.default_rng(seed).random(len(val))
    prio = np.log(np.maximum(u, 1e-300)) / np.maximum(w, 1e-300)
    # the latent's top contexts first (priority +inf), so a band never repeats them
    tl = np.broadcast_to(np.arange(L)[:, None], top_r.shape)[top_r >= 0]
    tr = top_r[top_r >= 0]
    all_lat = np.concatenate([tl, lat])
    all_prio = np.concatenate([np.full(len(tl), np.inf), prio])
    all_key = coll.keys[np.concatenate([tr, row])]
    o = np.lexsort((-all_prio, all_key, all_lat))
    dup = np.zeros(len(o), bool)
    dup[1:] = (all_lat[o][1:] == all_lat[o][:-1]) & (all_key[o][1:] == all_key[o][:-1])
    ok = np.zeros(len(o), bool)
    ok[o] = ~dup
    ok[:len(tl)] = False  # the top examples are taken elsewhere
    idx = np.flatnonzero(ok) - len(tl)
    lat, band, val, row, prio = lat[idx], band[idx], val[idx], row[idx], prio[idx]
    o = np.lexsort((-prio, band, lat))
    lat, band, val, row = lat[o], band[o], val[o], row[o]
    group = lat * (nb + 1) + band
    start = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    rank = np.arange(len(group)) - np.repeat(start, np.diff(np.r_[start, len(group)]))
    take = rank < spec.per_band
    return (lat[take], band[take], val[take].astype(np.float32), row[take]), edges, share


def select_examples(coll: Collection, spec: BrowserSpec) -> Examples:
    """Top and band examples of every column and latent (module docstring)."""
    parts, edges, shares = [], [], []
    for c in range(len(coll.columns)):
        tv, tr = coll.top_values[c], coll.top_rows[c]
        lat, k = np.nonzero(tr >= 0)
        parts.append((np.full(len(lat), c), lat, np.full(len(lat), TOP), tv[lat, k].astype(np.float32), tr[lat, k]))
        (bl, bb, bv, br), e, s = _draw_bands(coll, c, spec, spec.seed + 7919 * c)
        parts.append((np.full(len(bl), c), bl, bb, bv, br))
        edges.append(e)
        shares.append(s)
    cols = [np.concatenate([p[i] for p in parts]) for i in range(5)]
    return Examples(cols[0].astype(np.int64), cols[1].astype(np.int64), cols[2].astype(np.int64),
                    cols[3].astype(np.float32), cols[4].astype(np.int64), np.stack(edges), np.stack(shares))


def _segments(rows: np.ndarray, gap: int, max_rows: int, max_span: int) -> Iterator[tuple[int, int]]:
    """Runs [i, j) of sorted rows read together: no gap over `gap`, at most max_rows and max_span."""
    breaks = np.flatnonzero(np.diff(rows) > gap) + 1
    i, n = 0, len(rows)
    while i < n:
        j = min(n, i + max_rows, int(np.searchsorted(rows, rows[i] + max_span, side="left")))
        nxt = np.searchsorted(breaks, i, side="right")
        if nxt < len(breaks):
            j = min(j, int(breaks[nxt]))
        j = max(j, i + 1)
        yield i, j
        i = j


@torch.no_grad()
def window_activations(inp: ScanInputs, coll: Collection, ex: Examples, spec: BrowserSpec, *,
                       device: str | torch.device = "cpu", batch_rows: int = 4096) -> Examples:
    """Fill ex.tokens and ex.acts: each window's tokens and the latent's activation on each."""
    ctx = coll.context_length
    wr, center = window_rows(ex.row, ctx, spec.context_before, spec.context_after)
    flat = coll.tokens.reshape(-1)
    inside = (wr >= 0) & (wr < flat.size)
    ex.tokens = np.where(inside, flat[np.clip(wr, 0, flat.size - 1)], -1).astype(np.int32)
    ex.center = spec.context_before
    acts = np.full(wr.shape, np.nan, dtype=np.float32)
    usable = inside if inp.include_first_position else inside & (wr % ctx != 0)
    chunk = inp.arrays[0].chunk_rows
    for c, which in enumerate(inp.column_arrays):
        e_idx, w_idx = np.nonzero(usable & (ex.column == c)[:, None])
        if e_idx.size == 0:
            continue
        prow, plat = wr[e_idx, w_idx], ex.latent[e_idx]
        uniq, inv = np.unique(prow, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        inv_sorted = inv[order]
        for i, j in _segments(uniq, chunk, batch_rows, 4 * chunk):
            lo, hi = int(uniq[i]), int(uniq[j - 1]) + 1
            take = torch.from_numpy(uniq[i:j] - lo)
            x = torch.stack([S.read_rows(inp.arrays[a], coll.first_row + lo, coll.first_row + hi)[take]
                             for a in which], dim=1).to(device)
            f = encode_column(inp.dictionary, x, range(len(which)))
            a, b = np.searchsorted(inv_sorted, i), np.searchsorted(inv_sorted, j)
            pick = order[a:b]
            got = f[torch.from_numpy(inv[pick] - i).to(f.device), torch.from_numpy(plat[pick]).to(f.device)]
            acts[e_idx[pick], w_idx[pick]] = got.float().cpu().numpy()
    ex.acts = acts
    assert np.all(center == ex.center)
    return ex
