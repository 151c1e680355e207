"""Per-latent collectors of one streaming pass: memory bounded by latents, never by rows.

Each collector takes a batch's active codes as (latent, value, row) entries, with torch ops over
all of them at once (no Python loop over latents or rows): sparse codes make every update cost
about the number of active codes, so the pass costs about what encoding costs.

- `TopContexts`: the k largest activations of every latent over *distinct* contexts. Rows carry
  a context key (a hash of the tokens shown around them, `windows.context_keys`); when two rows
  have the same key only the larger activation is kept, so a passage repeated in the data shows
  once. Exact: the result is the top k of a scan over all rows, one per context, equal values
  in row order (as a stable sort of all rows would have them). Only entries at or above their
  latent's k-th value are merged, so after the first batches the merge is small.
- `BinnedSamples`: per latent, a linear histogram over [0, R) with R the smallest power of two
  above the latent's largest activation so far, and `samples` independent uniform draws from the
  activations in each bin (bottom-1 by a random 62-bit key: the entry with the smallest key of a
  bin is a uniform draw from it). When a latent's maximum outgrows R, R doubles and bins merge in
  pairs; the merged draw is the one with the smaller key, still uniform over the merged bin, so
  counts and draws stay exact whatever order the rows come in. Band examples (evals/browser/
  examples.py) are drawn from these.
- `FiringCounts`: per latent, tokens fired on, sum of activations, and firing counts per group
  of rows (token-set source, token class).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

_NO_KEY = (1 << 62) + 1  # above every random key: an empty reservoir slot


def _order_bits(value: Tensor) -> Tensor:
    """int64 keys that sort like the float32 values (negative ones included)."""
    bits = value.float().view(torch.int32).long()
    return torch.where(bits < 0, -(1 << 31) - 1 - (bits & ((1 << 31) - 1)), bits)


class TopContexts:
    """Running top-k activations of every latent over distinct context keys.

    Order: value descending, then scan row ascending (the first row of equal values wins, as a
    stable sort over all rows would have it); of rows sharing a context key, that order's first is
    the one kept. Heaps are [latents, k], sorted in that order.
    """

    def __init__(self, n_latents: int, k: int, device="cpu"):
        self.k, self.n_latents = int(k), int(n_latents)
        self.values = torch.full((n_latents, self.k), -math.inf, device=device)
        self.rows = torch.full((n_latents, self.k), -1, dtype=torch.long, device=device)
        self.keys = torch.zeros((n_latents, self.k), dtype=torch.long, device=device)
        self.last_row = -1  # the largest row seen: heaps hold only rows up to it

    def update(self, latent: Tensor, value: Tensor, row: Tensor, key: Tensor) -> None:
        """Active entries of a batch: latent, value, scan row and context key, each [n]."""
        if latent.numel() == 0:
            return
        value = value.float()
        # an entry below its latent's k-th value can never enter (that value only grows): after
        # the first batches few pass, and the work below is about the passing entries only
        keep = value >= self.values[:, -1].index_select(0, latent)
        in_order = bool(row.min() > self.last_row) and _rows_ascend_per_latent(latent, row)
        self.last_row = max(self.last_row, int(row.max()))
        if not bool(keep.any()):
            return
        latent, value, row, key = latent[keep], value[keep], row[keep], key[keep]
        dev = latent.device
        touched = torch.bincount(latent, minlength=self.n_latents)
        cols = touched.nonzero().squeeze(1)
        col_of = torch.zeros(self.n_latents, dtype=torch.long, device=dev)
        col_of[cols] = torch.arange(len(cols), device=dev)
        U, k = len(cols), self.k
        old_v = self.values.index_select(0, cols)
        ok = old_v > -math.inf
        c = torch.cat([torch.arange(U, device=dev)[:, None].expand(U, k)[ok], col_of[latent]])
        v = torch.cat([old_v[ok], value])
        r = torch.cat([self.rows.index_select(0, cols)[ok], row])
        h = torch.cat([self.keys.index_select(0, cols)[ok], key])
        # one stable sort by (column, value descending): the heaps (in heap order, earlier rows)
        # come first and each latent's new entries come in row order, so equal values stay in row
        # order. Otherwise (rows fed out of order) a stable sort by row first makes it so.
        o = None if in_order else torch.argsort(r, stable=True)
        packed = c * (1 << 32) + ((1 << 31) - 1 - _order_bits(v))
        o = torch.argsort(packed, stable=True) if o is None else o[torch.argsort(packed[o], stable=True)]
        c, v, r, h = c[o], v[o], r[o], h[o]
        count = torch.bincount(c, minlength=U)
        rank = torch.arange(len(c), device=dev) - (torch.cumsum(count, 0) - count)[c]
        # the first 2k of a column almost always hold k distinct contexts; the columns where they
        # do not (a context repeated more than k times) are redone with all their entries
        m = min(2 * k, int(count.max()))
        tv, tr, th, distinct = self._first_distinct(*_dense(c, rank, v, r, h, U, m))
        redo = (distinct < k) & (count > m)
        if bool(redo.any()):
            rc = redo.nonzero().squeeze(1)
            sub = redo[c]
            remap = torch.full((U,), -1, dtype=torch.long, device=dev)
            remap[rc] = torch.arange(len(rc), device=dev)
            new = _dense(remap[c[sub]], rank[sub], v[sub], r[sub], h[sub], len(rc), int(count[rc].max()))
            tv[rc], tr[rc], th[rc], _ = self._first_distinct(*new)
        self.values[cols], self.rows[cols], self.keys[cols] = tv, tr, th

    def _first_distinct(self, v: Tensor, r: Tensor, h: Tensor):
        """Per column of [U, m] entries in heap order (-inf padded at the end): the first k of
        distinct keys; (values, rows, keys [U, k], distinct keys among the m [U])."""
        valid = v > -math.inf
        h = torch.where(valid, h, h[:, :1])  # padding repeats the first key: never a new context
        hs, by_key = h.sort(dim=1, stable=True)
        repeat = torch.zeros_like(valid)
        repeat[:, 1:] = hs[:, 1:] == hs[:, :-1]  # stable: the first of equal keys is the best entry
        kept = valid & ~torch.zeros_like(valid).scatter_(1, by_key, repeat)
        pos = torch.cumsum(kept, 1) - 1
        u, j = (kept & (pos < self.k)).nonzero(as_tuple=True)
        U, dev = v.shape[0], v.device
        tv = torch.full((U, self.k), -math.inf, device=dev)
        tr = torch.full((U, self.k), -1, dtype=torch.long, device=dev)
        th = torch.zeros((U, self.k), dtype=torch.long, device=dev)
        p = pos[u, j]
        tv[u, p], tr[u, p], th[u, p] = v[u, j], r[u, j], h[u, j]
        return tv, tr, th, kept.sum(1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values [latents, k], rows [latents, k]) largest first; rows -1 (value 0) past the end."""
        return self.values.clamp_min(0).cpu().numpy(), self.rows.cpu().numpy()


def _dense(c: Tensor, rank: Tensor, v: Tensor, r: Tensor, h: Tensor, U: int, m: int) -> tuple:
    """Entries sorted by column into [U, m] (values, rows, keys) by rank, -inf padded; rank >= m dropped."""
    take = rank < m
    c, rank = c[take], rank[take]
    dev = c.device
    nv = torch.full((U, m), -math.inf, device=dev)
    nr = torch.full((U, m), -1, dtype=torch.long, device=dev)
    nh = torch.zeros((U, m), dtype=torch.long, device=dev)
    nv[c, rank], nr[c, rank], nh[c, rank] = v[take], r[take], h[take]
    return nv, nr, nh


def _rows_ascend_per_latent(latent: Tensor, row: Tensor) -> bool:
    """Whether each latent's entries come in row order: row-major or (latent, row)-sorted."""
    if latent.numel() < 2:
        return True
    dr, dl = row[1:] - row[:-1], latent[1:] - latent[:-1]
    return bool((dr >= 0).all()) or bool(((dl > 0) | ((dl == 0) & (dr >= 0))).all())


class BinnedSamples:
    """Per-latent linear histograms over a doubling range, with uniform draws per bin."""

    def __init__(self, n_latents: int, bins: int, samples: int, seed: int = 0, device="cpu"):
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.n_latents, self.bins, self.samples = int(n_latents), int(bins), int(samples)
        self.device = torch.device(device)
        n = self.n_latents * self.bins
        self.range = torch.zeros(self.n_latents, device=device)  # 0: never fired
        self.counts = torch.zeros(n, dtype=torch.long, device=device)
        self.key = torch.full((samples, n), _NO_KEY, dtype=torch.long, device=device)
        self.value = torch.zeros((samples, n), device=device)
        self.row = torch.full((samples, n), -1, dtype=torch.long, device=device)
        self.gen = torch.Generator(device=self.device).manual_seed(int(seed))

    def update(self, latent: Tensor, value: Tensor, row: Tensor) -> None:
        """The active entries of a batch: latent [n], value [n] (> 0), scan row [n]."""
        if latent.numel() == 0:
            return
        value = value.float()
        top = torch.zeros(self.n_latents, device=self.device).scatter_reduce_(0, latent, value, "amax")
        need = torch.where(top > 0, torch.exp2(torch.floor(torch.log2(top.clamp_min(1e-30))) + 1), 0.0)
        new = torch.maximum(self.range, need)
        grow = (self.range > 0) & (new > self.range)
        if bool(grow.any()):
            ids = grow.nonzero().squeeze(1)
            self._merge(ids, torch.round(torch.log2(new[ids] / self.range[ids])).long())
        self.range = new
        b = (value / new[latent] * self.bins).long().clamp_(0, self.bins - 1)
        g = latent * self.bins + b
        self.counts.index_add_(0, g, torch.ones_like(g))
        # every sample at once, over the flat [samples * latents * bins] reservoirs: an entry can
        # win only if its key is below its bin's (few, once bins fill); no boolean-mask copies
        n, nb, S = g.numel(), self.counts.numel(), self.samples
        flat = (torch.arange(S, device=self.device)[:, None] * nb + g[None, :]).reshape(-1)
        u = torch.randint(0, 1 << 62, (S * n,), generator=self.gen, device=self.device)
        keys = self.key.view(-1)
        below = u < keys.index_select(0, flat)
        keys.scatter_reduce_(0, flat, torch.where(below, u, _NO_KEY), "amin")  # the bin's smallest key
        won = (below & (u == keys.index_select(0, flat))).nonzero().squeeze(1)
        at, entry = flat.index_select(0, won), won % n
        self.value.view(-1).index_copy_(0, at, value.index_select(0, entry))
        self.row.view(-1).index_copy_(0, at, row.index_select(0, entry))

    def _merge(self, ids: Tensor, shifts: Tensor) -> None:
        """Latents `ids` double their range `shifts` times: bin i goes to bin i >> shift."""
        L, B, S = self.n_latents, self.bins, self.samples
        target = torch.arange(B, device=self.device)[None, :] >> shifts.clamp(max=62)[:, None]  # [m, B]
        counts = self.counts.view(L, B)
        old = counts.index_select(0, ids)
        counts.index_copy_(0, ids, torch.zeros_like(old).scatter_add_(1, target, old))
        key = self.key.view(S, L, B).index_select(1, ids)  # [S, m, B]
        tgt = target.expand_as(key)
        best = torch.full_like(key, _NO_KEY).scatter_reduce_(2, tgt, key, "amin")
        win = (key == best.gather(2, tgt)) & (key != _NO_KEY)
        tgt = torch.where(win, tgt, B)  # losers of a merge go to an extra column, dropped
        for store, empty in ((self.value, 0.0), (self.row, -1)):
            view = store.view(S, L, B)
            old = view.index_select(1, ids)
            out = torch.full((S, len(ids), B + 1), empty, dtype=store.dtype, device=self.device)
            view.index_copy_(1, ids, out.scatter_(2, tgt, old)[:, :, :B].contiguous())
        self.key.view(S, L, B).index_copy_(1, ids, best)

    def result(self) -> dict[str, np.ndarray]:
        """range [L]; counts [L, bins]; sample value / row [L, bins, samples] (row -1: none)."""
        L, B, S = self.n_latents, self.bins, self.samples
        return {"range": self.range.cpu().numpy(),
                "counts": self.counts.view(L, B).cpu().numpy(),
                "sample_value": self.value.view(S, L, B).permute(1, 2, 0).cpu().numpy(),
                "sample_row": self.row.view(S, L, B).permute(1, 2, 0).cpu().numpy()}


class FiringCounts:
    """Tokens each latent fired on, the sum of its activations, and firings per row group.

    `groups` maps a group name to a [n_rows] bool mask over scan rows (a source, a token class);
    a row may be in several groups.
    """

    def __init__(self, n_latents: int, groups: dict[str, np.ndarray], device="cpu"):
        self.n_latents = int(n_latents)
        self.fired = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.total = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.names = list(groups)
        self.masks = (torch.from_numpy(np.stack([np.asarray(m, bool) for m in groups.values()])).to(device)
                      if groups else None)
        self.group_fired = torch.zeros((len(self.names), n_latents), dtype=torch.long, device=device)
        self.n_rows = 0
        self.group_rows = torch.zeros(len(self.names), dtype=torch.long, device=device)

    def update(self, rows: Tensor, latent: Tensor, value: Tensor, active_row: Tensor) -> None:
        """rows [b]: the batch's scan rows; active entries (latent, value, index into rows)."""
        self.n_rows += rows.shape[0]
        ones = torch.ones_like(latent)
        self.fired.index_add_(0, latent, ones)
        self.total.index_add_(0, latent, value.double())
        if self.masks is None:
            return
        self.group_rows += self.masks[:, rows].sum(1)
        g, e = self.masks[:, rows[active_row]].nonzero(as_tuple=True)  # (group, entry) pairs
        self.group_fired.view(-1).index_add_(0, g * self.n_latents + latent[e], torch.ones_like(e))

    def result(self) -> dict:
        return {"n_rows": self.n_rows, "fired": self.fired.cpu().numpy(), "total": self.total.cpu().numpy(),
                "groups": self.names, "group_rows": self.group_rows.cpu().numpy(),
                "group_fired": self.group_fired.cpu().numpy()}
