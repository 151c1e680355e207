"""Per-latent collectors of one streaming pass: memory bounded by latents, never by rows.

Each collector takes a batch's active codes as (latent, value, row) entries, with torch ops over
all of them at once (no Python loop over latents or rows): sparse codes make every update cost
about the number of active codes, so the pass costs about what encoding costs.

- `TopContexts`: the k largest activations of every latent over *distinct* contexts. Rows carry
  a context key (a hash of the tokens shown around them, `windows.context_keys`); when two rows
  have the same key only the larger activation is kept, so a passage repeated in the data shows
  once. Exact: the result is the top k of a scan over all rows, one per context.
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


class TopContexts:
    """Running top-k activations of every latent over distinct context keys."""

    def __init__(self, n_latents: int, k: int, device="cpu"):
        self.k, self.n_latents = int(k), int(n_latents)
        self.values = torch.full((self.k, n_latents), -math.inf, device=device)
        self.rows = torch.full((self.k, n_latents), -1, dtype=torch.long, device=device)
        self.keys = torch.zeros((self.k, n_latents), dtype=torch.long, device=device)

    def update(self, latent: Tensor, value: Tensor, row: Tensor, key: Tensor) -> None:
        """Active entries of a batch: latent, value (> 0), scan row and context key, each [n]."""
        # an entry at or below its latent's k-th value can never enter (that value only grows):
        # after the first batches almost nothing passes, so the work below stays small
        keep = value.float() > self.values[-1].index_select(0, latent)
        if not bool(keep.any()):
            return
        latent, value, row, key = latent[keep], value[keep].float(), row[keep], key[keep]
        touched = torch.bincount(latent, minlength=self.n_latents)
        cols = touched.nonzero().squeeze(1)
        col_of = torch.zeros(self.n_latents, dtype=torch.long, device=latent.device)
        col_of[cols] = torch.arange(len(cols), device=latent.device)
        col = col_of[latent]
        # by (column, value descending) in one sort: positive float32 bits order like the values
        bits = value.view(torch.int32).long()
        o = torch.argsort(col * (1 << 31) + ((1 << 31) - 1 - bits))
        c = col[o]
        rank = torch.arange(len(c), device=c.device) - torch.searchsorted(c, c, side="left")
        # the 2k largest per column usually hold k distinct contexts; columns where they do not
        # (a context repeated more than k times in the batch) take all their entries
        short = self._merge(cols, c, o, rank < 2 * self.k, value, row, key)
        redo = short & (touched[cols] > 2 * self.k)
        if bool(redo.any()):
            self._merge(cols, c, o, redo[c], value, row, key)

    def _merge(self, cols, c, o, take, value, row, key) -> Tensor:
        """Merge the entries o[take] (sorted by column, value desc) into the kept contexts of their
        columns; returns [columns] bool: fewer than k distinct contexts among those entries."""
        c, o = c[take], o[take]
        rank = torch.arange(len(c), device=c.device) - torch.searchsorted(c, c, side="left")
        m = int(rank.max()) + 1
        U = len(cols)
        nv = torch.full((m, U), -math.inf, device=value.device)
        nr = torch.full((m, U), -1, dtype=torch.long, device=value.device)
        nh = torch.zeros((m, U), dtype=torch.long, device=value.device)
        nv[rank, c], nr[rank, c], nh[rank, c] = value[o], row[o], key[o]
        hs, by_key = nh.sort(dim=0)
        ok = (nv > -math.inf).gather(0, by_key)
        distinct = ok.sum(0) - ((hs[1:] == hs[:-1]) & ok[1:] & ok[:-1]).sum(0)
        v = torch.cat([self.values[:, cols], nv])
        r = torch.cat([self.rows[:, cols], nr])
        h = torch.cat([self.keys[:, cols], nh])
        # highest value first, then a stable sort by key: the first of each run of equal keys is
        # that context's largest activation, the rest are dropped
        order = v.argsort(dim=0, descending=True, stable=True)
        v, r, h = v.gather(0, order), r.gather(0, order), h.gather(0, order)
        by_key = h.argsort(dim=0, stable=True)
        hs, vs = h.gather(0, by_key), v.gather(0, by_key)
        repeat = torch.zeros_like(hs, dtype=torch.bool)
        repeat[1:] = (hs[1:] == hs[:-1]) & (vs[1:] > -math.inf)
        dup = torch.zeros_like(repeat).scatter_(0, by_key, repeat)
        v = v.masked_fill(dup, -math.inf)
        top, pick = v.topk(self.k, dim=0)
        self.values[:, cols] = top
        self.rows[:, cols] = r.gather(0, pick).masked_fill(top == -math.inf, -1)
        self.keys[:, cols] = h.gather(0, pick)
        return distinct < self.k

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values [latents, k], rows [latents, k]) largest first; rows -1 (value 0) past the end."""
        v = self.values.T.clamp_min(0).cpu().numpy()
        return v, self.rows.T.cpu().numpy()


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
        for s in range(self.samples):
            u = torch.randint(0, 1 << 62, g.shape, generator=self.gen, device=self.device)
            below = u < self.key[s].index_select(0, g)  # only these can win (few, once bins fill)
            gs, us = g[below], u[below]
            self.key[s].scatter_reduce_(0, gs, us, "amin")  # the bin's smallest key, old or new
            win = us == self.key[s].index_select(0, gs)
            gi, value_s, row_s = gs[win], value[below][win], row[below][win]
            self.value[s, gi] = value_s
            self.row[s, gi] = row_s

    def _merge(self, ids: Tensor, shifts: Tensor) -> None:
        """Latents `ids` double their range `shifts` times: bin i goes to bin i >> shift."""
        B = self.bins
        cols = torch.arange(B, device=self.device)
        target = cols[None, :] >> shifts.clamp(max=62)[:, None]  # [m, B]
        flat = (ids[:, None] * B + cols[None, :]).reshape(-1)
        counts = self.counts[flat].view(-1, B)
        self.counts[flat] = torch.zeros_like(counts).scatter_add_(1, target, counts).reshape(-1)
        trash = torch.full_like(target, B)  # losers of a merge go to an extra column, dropped
        for s in range(self.samples):
            key = self.key[s, flat].view(-1, B)
            best = torch.full_like(key, _NO_KEY).scatter_reduce_(1, target, key, "amin")
            win = (key == best.gather(1, target)) & (key != _NO_KEY)
            tgt = torch.where(win, target, trash)
            for store, empty in ((self.value, 0.0), (self.row, -1)):
                old = store[s, flat].view(-1, B)
                out = torch.full((old.shape[0], B + 1), empty, dtype=old.dtype, device=self.device)
                store[s, flat] = out.scatter_(1, tgt, old)[:, :B].reshape(-1)
            self.key[s, flat] = best.reshape(-1)

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
