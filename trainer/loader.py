"""Shuffled batches of several models' activations at one hook, aligned token by token.

Row i of every batch is the same token in every model: batches are [batch, n_models, d_model],
on the CPU in the stored dtype (bfloat16 or float32) unless ``float32=True``; on CUDA they travel
in the stored dtype (half the bytes of float32 for bfloat16) and are converted on the device.

The order of the rows (a seeded chunk permutation per epoch, windows of about ``buffer_tokens``
rows, a row permutation per window) is trainer/shuffle_window.py's; reading one chunk is
trainer/readers.py's. This module runs them: ``read_threads`` threads read a window's chunks, each
(of each model) in place into its contiguous slot of a window buffer [n_models, window_rows,
d_model], and checksum it there. Two such buffers are reused for the whole run: while one window
is consumed the next is read. A batch-assembly thread keeps ``prefetch_batches`` batches ready,
each gathered from the window (one ``np.take`` of whole rows, the batch's only copy) into a reused
page-aligned buffer: memory is two windows plus a few batches, never the store. Nothing depends on
thread timing: the batches are the same whatever the threads do.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import store as S
from pipeline.store import CorruptChunkError
from trainer.aligned_arrays import IncompatibleArraysError, check_aligned
from trainer.readers import BufferPool, aligned_empty, direct_rule, memory_available, open_readers
from trainer.shuffle_window import ShuffleWindows

__all__ = ["ActivationLoader", "CorruptChunkError", "IncompatibleArraysError", "STATE_FORMAT", "STATE_VERSION"]

STATE_FORMAT = "mdiff-loader"
STATE_VERSION = 1
# the configuration a saved state belongs to: resuming under another one would silently
# give another stream
_STATE_KEYS = ("split", "shuffle", "seed", "batch_size", "include_first_position",
               "window_chunks", "chunk_rows", "rows_per_epoch", "tokenset_id", "arrays")


@dataclass
class _LiveWindow:
    epoch: int
    window: int
    buffer: np.ndarray  # [n_models, window_rows, d_model]
    flat: np.ndarray  # rows of buffer.reshape(-1, d_model) in stream order, n_models per token
    futures: list
    ready: bool = False


_END = object()
_CLOSED = object()


class _Pipeline:
    """One iteration: a batch-assembly thread feeding a bounded queue."""

    def __init__(self, loader: ActivationLoader, epoch: int, batch: int):
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, loader.prefetch_batches))
        self.stop = threading.Event()
        self.closed = False
        self.thread = threading.Thread(target=loader._produce, args=(epoch, batch, self.queue, self.stop),
                                       name="mdiff-loader-assemble", daemon=True)
        self.thread.start()

    def get(self):
        return _CLOSED if self.closed else self.queue.get()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()
        while not self.queue.empty():  # drop prefetched batches: they hold pooled buffers
            self.queue.get_nowait()
        self.queue.put(_CLOSED)


def _resolve_device(device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        return torch.device("cpu")
    return torch.device(device)


class ActivationLoader:
    """Aligned batches [batch_size, n_models, d_model] of several models' arrays at one hook.

    Iterating a shuffled loader (the default for split="train") gives an endless stream of
    epochs; each ``iter()`` continues it from the current position. An unshuffled loader (the
    default for "validation") makes one sequential pass per ``iter()``, final partial batch
    included, and has a ``len()``. ``state_dict()`` / ``load_state_dict()`` save and restore the
    position: a restored loader yields exactly the batches an uninterrupted one would have.

    Every chunk read is checked against the CRC-32 recorded when it was written (``verify``, on by
    default), so damaged files stop training with the chunk named instead of feeding it garbage;
    the read threads check each piece of a chunk as it arrives, off the batch-assembly path.

    ``direct_io`` ("auto", "always"/True, "never"/False) says how the "mmap" reader reads what is
    not already in the page cache (what is, it always takes from there): O_DIRECT or buffered.
    "auto" applies ``trainer.readers.direct_rule``: buffered only when the split fits in half the
    available memory and ``planned_rows`` (the rows the caller means to read, e.g. steps x batch
    size; default one epoch) come back to it, so that the page cache can serve the later passes;
    O_DIRECT otherwise. ``direct_io_reason`` says what it chose and why.

    ``float32``: yield float32 batches. None (default): on CUDA yes (batches travel in the stored
    dtype, pinned, non_blocking on the current stream, and ``.float()`` runs on the device); on the
    CPU no. On the CPU, ``float32=True`` converts each batch in the assembly thread into reused
    buffers: a caller's ``batch.float()`` page-faults a fresh 64 MiB tensor per 4,096 x 2 x 2,048
    batch (26 ms against 2-4 ms into a reused one here: 2.3x the tokens/s in benchmarks/bench_loader.py).

    A yielded CPU batch owns its memory until the caller drops it; the loader recycles a batch's
    memory only once nothing references it any more (page-faulting fresh 32 MiB buffers for every
    batch cost 8x in the gather). The gather, the one copy on the batch's path, is split over
    ``gather_threads`` threads (default: the cores, up to 4).

    ``rank`` / ``world_size`` (data-parallel training, trainer/distributed.py): yield only this
    process's slice of every batch, rows [n * rank // world_size, n * (rank + 1) // world_size) of
    a batch of n rows. The batches, their order and ``state_dict()`` are those of one process, so the
    position is the same whatever the number of processes; each process still reads the whole
    windows its slices come from (on one machine the page cache holds them once for all), only
    the gather and what follows are split.
    """

    def __init__(self, arrays: list[S.ActivationArray], token_set: S.TokenSet, *, split: str,
                 batch_size: int, seed: int = 0, buffer_tokens: int = 262_144, read_threads: int = 4,
                 reader: str = "auto", include_first_position: bool = False, device="cpu",
                 shuffle: bool | None = None, verify: bool = True, prefetch_batches: int = 2,
                 direct_io: bool | str = "auto", float32: bool | None = None, gather_threads: int | None = None,
                 planned_rows: int | None = None, rank: int = 0, world_size: int = 1):
        arrays = list(arrays)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of world_size {world_size} processes")
        self.rank, self.world_size = int(rank), int(world_size)
        slice_rows = -(-int(batch_size) // self.world_size)  # the largest slice of a batch
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
        if reader not in ("auto", "mmap", "zarr"):
            raise ValueError(f"reader must be 'auto', 'mmap' or 'zarr', not {reader!r}")
        gather_threads = min(4, os.cpu_count() or 1) if gather_threads is None else gather_threads
        if min(batch_size, read_threads, buffer_tokens, gather_threads) < 1:
            raise ValueError("batch_size, read_threads, gather_threads and buffer_tokens must be positive")
        if planned_rows is not None and planned_rows < 0:
            raise ValueError(f"planned_rows must be the rows the caller means to read (>= 0), not {planned_rows}")
        if not arrays:
            raise ValueError("the loader needs at least one activation array")
        check_aligned(arrays, token_set)
        for a in arrays:
            a.require_complete()  # an incomplete array reads as zeros where it was never written

        first = arrays[0]
        self.arrays, self.token_set = arrays, token_set
        self.split, self.seed, self.batch_size = split, int(seed), int(batch_size)
        self.include_first_position, self.verify = bool(include_first_position), bool(verify)
        self.shuffle = (split == "train") if shuffle is None else bool(shuffle)
        self.read_threads, self.prefetch_batches = int(read_threads), int(prefetch_batches)
        self.gather_threads = int(gather_threads)
        self.device = _resolve_device(device)
        self.n_models, self.d_model = len(arrays), first.d_model
        self.storage_dtype = first.storage_dtype
        self._np_dtype = S.NUMPY_DTYPE[self.storage_dtype]
        self.float32 = self.device.type == "cuda" if float32 is None else bool(float32)
        self.dtype = torch.float32 if self.float32 else S.TORCH_DTYPE[self.storage_dtype]
        # bfloat16 made float32 on the CPU, by the assembly thread: gathered into a staging buffer first
        self._convert = self.float32 and self.device.type != "cuda" and self.storage_dtype != "float32"
        self.chunk_rows, self.n_rows = first.chunk_rows, first.n_rows
        self.context_length = token_set.context_length
        n_train = token_set.n_train_sequences * self.context_length
        self.split_rows = (0, n_train) if split == "train" else (n_train, self.n_rows)
        self._order = ShuffleWindows(
            split=split, split_rows=self.split_rows, chunk_rows=self.chunk_rows,
            context_length=self.context_length, include_first_position=self.include_first_position,
            shuffle=self.shuffle, seed=self.seed, batch_size=self.batch_size, buffer_tokens=buffer_tokens)
        self.rows_per_epoch, self.batches_per_epoch = self._order.rows_per_epoch, self._order.batches_per_epoch
        self.window_chunks, self.window_rows = self._order.window_chunks, self._order.window_rows

        split_bytes = (self.split_rows[1] - self.split_rows[0]) * self.n_models * self.d_model \
            * np.dtype(self._np_dtype).itemsize
        passes = 1.0 if planned_rows is None else planned_rows / max(1, self.rows_per_epoch)
        self.direct_io, self.direct_io_reason = direct_rule(direct_io, split_bytes, passes, memory_available())
        self._crcs, self._readers = open_readers(arrays, reader, self.verify, self.direct_io)
        self.readers = tuple(r.name for r in self._readers)

        self._epoch, self._batch, self._resume = 0, 0, False
        self._executor: ThreadPoolExecutor | None = None
        self._buffers: list[np.ndarray | None] = [None, None]
        self._out_pool = BufferPool((slice_rows, self.n_models, self.d_model),
                                    np.float32 if self.float32 else self._np_dtype, self.prefetch_batches + 4)
        self._stage: np.ndarray | None = None
        self._gather_pool: ThreadPoolExecutor | None = None
        self._tls = threading.local()
        self._active: _Pipeline | None = None

    # public
    def __repr__(self) -> str:
        return (f"ActivationLoader({self.split}, {self.n_models} models x d_model {self.d_model}, "
                f"batch {self.batch_size}, {self.rows_per_epoch:,} rows/epoch, readers {self.readers})")

    def __len__(self) -> int:
        if self.shuffle:
            raise TypeError("a shuffled loader is an endless stream; see batches_per_epoch")
        return self.batches_per_epoch

    def __iter__(self):
        if self._active is not None:
            self._active.close()  # one live iteration per loader: they share the buffers
        if self.shuffle or self._resume:
            start = (self._epoch, self._batch)
        else:
            start = (self._epoch, 0)  # every iter() of an unshuffled loader is a new pass
        self._resume = False
        return self._iterate(*start)

    def epoch_rows(self, epoch: int = 0) -> np.ndarray:
        """The array rows an epoch yields, in order (batches are consecutive slices of it)."""
        return self._order.epoch_rows(epoch, self.batch_size)

    def state_dict(self) -> dict:
        """JSON-able position and the settings that determine the stream."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, **self._identity(),
                "epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a loader state of version {STATE_VERSION}: {state.get('format')!r} "
                             f"version {state.get('version')!r}")
        mine = self._identity()
        diff = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in _STATE_KEYS if state.get(k) != mine[k]]
        if diff:
            raise ValueError("the saved loader state belongs to another data stream (" + "; ".join(diff)
                             + "); resume with the same data settings")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= batch < max(1, self.batches_per_epoch) or epoch < 0:
            raise ValueError(f"saved position epoch {epoch} batch {batch} is out of range")
        if self._active is not None:
            self._active.close()
        self._epoch, self._batch, self._resume = epoch, batch, True

    def close(self) -> None:
        """Stop background threads and free the buffers (also done when the loader is collected)."""
        if self._active is not None:
            self._active.close()
            self._active = None
        for pool in (self._executor, self._gather_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._executor = self._gather_pool = None
        self._buffers = [None, None]
        self._out_pool.clear()
        self._stage = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn things down
            self.close()

    # the stream's identity
    def _identity(self) -> dict:
        return {"split": self.split, "shuffle": self.shuffle, "seed": self.seed,
                "batch_size": self.batch_size, "include_first_position": self.include_first_position,
                "window_chunks": self.window_chunks, "chunk_rows": self.chunk_rows,
                "rows_per_epoch": self.rows_per_epoch, "tokenset_id": self.token_set.id,
                "arrays": [a.path for a in self.arrays]}

    # reading (pool threads)
    def _scratch(self, n_rows: int) -> np.ndarray:
        buf = getattr(self._tls, "buf", None)
        if buf is None:
            buf = self._tls.buf = aligned_empty((self.chunk_rows, self.d_model), self._np_dtype)
        return buf[:n_rows]

    def _read_chunk(self, model: int, chunk: int, buffer: np.ndarray, slot: int) -> None:
        lo = chunk * self.chunk_rows
        hi = min(lo + self.chunk_rows, self.n_rows)
        dest = buffer[model, slot * self.chunk_rows: slot * self.chunk_rows + hi - lo]
        got = self._readers[model].read(chunk, lo, hi, dest, self._scratch)  # its CRC-32, if verifying
        if self.verify and got != self._crcs[model][chunk]:
            expected = self._crcs[model][chunk]
            raise S.corrupt_chunk(self.arrays[model], chunk, lo, hi, f"fails its checksum: CRC-32 "
                                  f"{got:#010x}, recorded {expected:#010x}")

    def _schedule(self, g: int) -> _LiveWindow:
        epoch, w = divmod(g, self._order.n_windows)
        chunks = self._order.plan(epoch).windows[w]
        if self._buffers[g % 2] is None:
            self._buffers[g % 2] = aligned_empty((self.n_models, self.window_rows, self.d_model), self._np_dtype)
        buffer = self._buffers[g % 2]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.read_threads, thread_name_prefix="mdiff-read")
        futures = [self._executor.submit(self._read_chunk, m, int(self._order.chunk_ids[i]), buffer, slot)
                   for slot, i in enumerate(chunks) for m in range(self.n_models)]
        rows = self._order.rows_of_window(epoch, w, chunks)[1]
        flat = (rows[:, None] + np.arange(self.n_models, dtype=np.int64) * self.window_rows).ravel()
        return _LiveWindow(epoch, w, buffer, flat, futures)

    @staticmethod
    def _release(lw: _LiveWindow) -> None:
        """Make sure no read still writes into the window's buffer before it is reused."""
        for f in lw.futures:
            f.cancel()
        wait_futures(lw.futures)

    # assembling (the pipeline thread)
    def _out_buffer(self, n: int) -> tuple[np.ndarray, torch.Tensor]:
        """(where the batch is gathered, the tensor yielded). Both are the same memory, except when
        a bfloat16 batch is converted on the CPU: then the gather goes to a staging buffer."""
        shape = (n, self.n_models, self.d_model)
        if self.device.type == "cuda":
            # torch's pinned-memory cache reuses the block once the copy reading it has finished
            host = torch.empty(shape, dtype=torch.uint16 if self.storage_dtype == "bfloat16" else torch.float32,
                               pin_memory=True)
            return host.numpy(), host
        if self._convert:
            if self._stage is None:
                self._stage = aligned_empty((self._out_pool.shape[0], self.n_models, self.d_model), self._np_dtype)
            return self._stage[:n], torch.from_numpy(self._out_pool.get()[:n])
        out = self._out_pool.get()[:n]
        return out, torch.from_numpy(out)

    def _take(self, src: np.ndarray, idx: np.ndarray, out: np.ndarray) -> None:
        """out[i] = src[idx[i]]: whole rows (np.take memcpys each, releasing the GIL), the index split
        over the assembly thread and gather_threads - 1 helpers: one thread gathered ~8 GB/s here,
        which alone would cap the loader near 1M tokens/s of 2 x 2048 bfloat16."""
        k = self.gather_threads if len(idx) >= 256 * self.gather_threads else 1
        if k > 1 and self._gather_pool is None:
            self._gather_pool = ThreadPoolExecutor(k - 1, thread_name_prefix="mdiff-gather")
        cuts = [len(idx) * i // k for i in range(k + 1)]
        helpers = [self._gather_pool.submit(np.take, src, idx[a:b], 0, out[a:b], "clip")
                   for a, b in zip(cuts[1:-1], cuts[2:])]
        np.take(src, idx[:cuts[1]], axis=0, out=out[:cuts[1]], mode="clip")
        for f in helpers:
            f.result()

    def _produce(self, epoch: int, batch: int, out: queue.Queue, stop: threading.Event) -> None:
        live: dict[int, _LiveWindow] = {}
        B, W = self.batch_size, self._order.n_windows

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            while True:
                if stop.is_set():
                    return
                if batch >= self.batches_per_epoch:
                    if not self.shuffle:
                        put(_END)
                        return
                    epoch, batch = epoch + 1, 0
                    continue
                plan = self._order.plan(epoch)
                s = batch * B
                e = min(s + B, self.rows_per_epoch)
                w0, w1 = plan.window_of(s), plan.window_of(e - 1)
                g0 = epoch * W + w0
                for g in [g for g in live if g < g0]:
                    self._release(live.pop(g))
                for g in (g0, g0 + 1):  # the current window, and the next one read ahead
                    if g not in live and (self.shuffle or g < (epoch + 1) * W):
                        live[g] = self._schedule(g)
                # this process's rows of the batch (all of them for one process)
                lo, hi = s + (e - s) * self.rank // self.world_size, s + (e - s) * (self.rank + 1) // self.world_size
                host_np, host = self._out_buffer(hi - lo)
                flat_out, M = host_np.reshape(-1, self.d_model), self.n_models
                pos = 0
                for w in range(w0, w1 + 1):
                    lw = live[epoch * W + w]
                    if not lw.ready:
                        for f in lw.futures:
                            f.result()  # raises a read's error here
                        lw.ready = True
                    a = max(lo, int(plan.starts[w])) - int(plan.starts[w])
                    z = min(hi, int(plan.starts[w + 1])) - int(plan.starts[w])
                    if z <= a:
                        continue
                    # one take of whole rows (d_model values, memcpy each) from [models * rows, d]
                    # into [tokens * models, d]: the batch's layout, contiguous
                    self._take(lw.buffer.reshape(-1, self.d_model), lw.flat[a * M:z * M],
                               flat_out[pos * M:(pos + z - a) * M])
                    pos += z - a
                assert pos == hi - lo
                if self._convert:
                    host.copy_(torch.from_numpy(host_np).view(torch.bfloat16))  # into a reused buffer
                elif self.storage_dtype == "bfloat16":
                    host = host.view(torch.bfloat16)
                del host_np, flat_out
                if not put(((epoch, batch), host)):
                    return
                del host
                batch += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(exc)
        finally:
            for lw in live.values():
                self._release(lw)

    def _iterate(self, epoch: int, batch: int):
        pipe = self._active = _Pipeline(self, epoch, batch)
        try:
            while True:
                item = pipe.get()
                if item is _CLOSED:
                    raise RuntimeError("this loader iterator was replaced by a newer iter() or "
                                       "load_state_dict(); iterate the new one")
                if item is _END:  # the position already says "next pass"
                    return
                if isinstance(item, BaseException):
                    raise item
                (e, b), x = item
                del item
                if self.device.type == "cuda":
                    x = x.to(self.device, non_blocking=True)
                    if self.float32:
                        x = x.float()  # on the device, after the copy on the same stream
                b += 1
                if b == self.batches_per_epoch:
                    e, b = e + 1, 0
                self._epoch, self._batch = e, b
                yield x
                del x
        finally:
            pipe.close()
            if self._active is pipe:
                self._active = None
