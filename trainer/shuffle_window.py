"""The order in which a split's rows are read: seeded, windowed, the same whatever the threads do.

How a training epoch is ordered (deterministic: nothing depends on thread timing):

1. The chunks of the split (chunk c = rows [c * chunk_rows, ...), clipped to the split) are
   permuted with ``np.random.default_rng([seed, epoch])``.
2. Consecutive groups of ``window_chunks`` chunks of that order are *windows* of about
   ``buffer_tokens`` rows; each chunk has a fixed slot in the window's buffer.
3. The window's usable rows (in the split; position 0 of each sequence excluded unless
   ``include_first_position``), listed slot by slot in row order, are permuted with
   ``np.random.default_rng([seed, epoch, window])``.
4. The epoch's row stream is the concatenation of its permuted windows; batch b is stream rows
   [b * batch_size, (b + 1) * batch_size) (it may span two windows); a final partial batch is
   dropped. Epochs follow each other forever.

Without shuffling (validation) the order is one sequential pass, final partial batch included,
through the smallest windows that hold a batch. The loader reads and assembles; this module only
says what goes where, so the order can be checked (and resumed) without reading a byte.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np


@dataclass
class EpochPlan:
    windows: list[np.ndarray]  # split-chunk numbers of each window, in slot order
    starts: np.ndarray  # starts[w]: first stream row of window w; starts[-1] = rows per epoch

    def window_of(self, stream_row: int) -> int:
        return int(np.searchsorted(self.starts, stream_row, side="right") - 1)


class ShuffleWindows:
    """The split's chunks, their usable rows, the window size, and each epoch's order."""

    def __init__(self, *, split: str, split_rows: tuple[int, int], chunk_rows: int, context_length: int,
                 include_first_position: bool, shuffle: bool, seed: int, batch_size: int,
                 buffer_tokens: int):
        self.split_rows, self.chunk_rows, self.context_length = split_rows, chunk_rows, context_length
        self.include_first_position, self.shuffle, self.seed = include_first_position, shuffle, seed

        # the split's chunks and how many usable rows each has
        lo, hi = split_rows
        cr, ctx = chunk_rows, context_length
        self.chunk_ids = np.arange(lo // cr, -(-hi // cr) if hi > lo else lo // cr, dtype=np.int64)
        a = np.maximum(self.chunk_ids * cr, lo)
        b = np.minimum(self.chunk_ids * cr + cr, hi)
        first_positions = 0 if include_first_position else (b - 1) // ctx - (a - 1) // ctx
        self.usable = (b - a - first_positions).astype(np.int64)
        self.rows_per_epoch = int(self.usable.sum())

        # windows: about buffer_tokens rows when shuffling (without, the window size changes only
        # memory, so it is the least that works), and never fewer usable rows than a batch, so
        # that a batch spans at most two windows (a split has at most 2 clipped chunks)
        min_full = cr if include_first_position else cr - math.ceil(cr / ctx)
        if min_full <= 0:
            raise ValueError(f"context_length {ctx} leaves no usable rows once position 0 is excluded; "
                             "set include_first_position")
        n_chunks = len(self.chunk_ids)
        k = max(round(buffer_tokens / cr) if shuffle else 1, 1,
                2 + math.ceil(batch_size / min_full))
        self.window_chunks = max(1, min(k, n_chunks))
        self.window_rows = self.window_chunks * cr
        self.n_windows = -(-n_chunks // self.window_chunks)

        if shuffle:
            self.batches_per_epoch = self.rows_per_epoch // batch_size
            if self.batches_per_epoch == 0:
                raise ValueError(f"the {split} split has {self.rows_per_epoch:,} usable rows, fewer "
                                 f"than one batch of {batch_size:,}")
        else:
            self.batches_per_epoch = -(-self.rows_per_epoch // batch_size)
        self._plans: dict[int, EpochPlan] = {}
        self._lock = threading.Lock()

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's windows (chunk order, step 1-2) and where each starts in the row stream."""
        with self._lock:
            plan = self._plans.get(epoch)
        if plan is None:
            n = len(self.chunk_ids)
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            k = self.window_chunks
            windows = [order[i:i + k] for i in range(0, n, k)]
            counts = [int(self.usable[w].sum()) for w in windows]
            plan = EpochPlan(windows, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))
            with self._lock:
                if len(self._plans) > 4:
                    self._plans.clear()
                self._plans[epoch] = plan
        return plan

    def rows_of_window(self, epoch: int, window: int, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(array rows, window-buffer rows) of a window's usable rows, in stream order (step 3)."""
        lo, hi = self.split_rows
        cr, ctx = self.chunk_rows, self.context_length
        rows, slots = [], []
        for slot, i in enumerate(chunks):
            c = int(self.chunk_ids[i])
            r = np.arange(max(c * cr, lo), min(c * cr + cr, hi), dtype=np.int64)
            if not self.include_first_position:
                r = r[r % ctx != 0]
            rows.append(r)
            slots.append(r + (slot - c) * cr)
        rows_a = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        rows_b = np.concatenate(slots) if slots else np.zeros(0, np.int64)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, window]).permutation(len(rows_a))
            rows_a, rows_b = rows_a[perm], rows_b[perm]
        return rows_a, rows_b

    def epoch_rows(self, epoch: int, batch_size: int) -> np.ndarray:
        """The array rows an epoch yields, in order (step 4: batches are consecutive slices)."""
        plan = self.plan(epoch)
        rows = [self.rows_of_window(epoch, w, plan.windows[w])[0] for w in range(len(plan.windows))]
        out = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        return out[: self.batches_per_epoch * batch_size] if self.shuffle else out
