"""Shuffled batches of several models' activations at one hook, aligned token by token.

Row i of every batch is the same token in every model: batches are [batch, n_models, d_model]
in the stored dtype (bfloat16 or float32); the trainer converts them to float32.

The order of the rows (a seeded chunk permutation per epoch, windows of about ``buffer_tokens``
rows, a row permutation per window) is trainer/shuffle_window.py's; reading one chunk is
trainer/readers.py's. This module runs them: a window's chunks are read by a pool of
``read_threads`` threads, each chunk (of each model) into its fixed slot of a preallocated window
buffer [window_chunks * chunk_rows, n_models, d_model]; two such buffers are reused for the whole
run. While one window is consumed the next is read in the background, and a batch-assembly thread
keeps ``prefetch_batches`` batches ready, so memory is two windows plus a few batches, never the
store. Nothing depends on thread timing: the batches are the same whatever the threads do.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import store as S
from pipeline.store import CorruptChunkError
from trainer.aligned_arrays import IncompatibleArraysError, check_aligned
from trainer.readers import aligned_empty, open_readers
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
    buffer: np.ndarray
    rows: np.ndarray  # buffer rows in stream order
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
        if self.closed:
            return _CLOSED
        return self.queue.get()

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

    Every chunk read is checked against the CRC-32 recorded when it was written (``verify``, on
    by default), so damaged files stop training with the chunk named instead of feeding it garbage;
    with zlib-ng's CRC it cost 10-15% of warm (page-cache) throughput here, and less when reads
    wait on the disk.

    ``direct_io=True`` makes the "mmap" reader bypass the page cache (O_DIRECT, falling back to
    buffered reads where the filesystem or the alignment does not allow it): for stores much
    larger than RAM it saves most of the reading CPU; for stores that fit in RAM it forgoes the
    page cache, so it is off by default (see benchmarks/bench_loader.py).

    A yielded CPU batch owns its memory until the caller drops it; the loader recycles a batch's
    memory only once nothing references it any more (page-faulting fresh 32 MiB buffers for every
    batch cost 8x in the gather). On CUDA, batches are assembled in pinned memory and copied with
    non_blocking=True on the current stream.
    """

    def __init__(self, arrays: list[S.ActivationArray], token_set: S.TokenSet, *, split: str,
                 batch_size: int, seed: int = 0, buffer_tokens: int = 262_144, read_threads: int = 4,
                 reader: str = "auto", include_first_position: bool = False, device="cpu",
                 shuffle: bool | None = None, verify: bool = True, prefetch_batches: int = 2,
                 direct_io: bool = False):
        arrays = list(arrays)
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
        if reader not in ("auto", "mmap", "zarr"):
            raise ValueError(f"reader must be 'auto', 'mmap' or 'zarr', not {reader!r}")
        if batch_size < 1 or read_threads < 1 or buffer_tokens < 1:
            raise ValueError("batch_size, read_threads and buffer_tokens must be positive")
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
        self.device = _resolve_device(device)
        self.n_models, self.d_model = len(arrays), first.d_model
        self.storage_dtype = first.storage_dtype
        self.dtype = S.TORCH_DTYPE[self.storage_dtype]
        self._np_dtype = S.NUMPY_DTYPE[self.storage_dtype]
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

        self._crcs, self._readers = open_readers(arrays, reader, self.verify, direct_io)
        self.readers = tuple(r.name for r in self._readers)

        self._epoch, self._batch, self._resume = 0, 0, False
        self._executor: ThreadPoolExecutor | None = None
        self._buffers: list[np.ndarray | None] = [None, None]
        self._out_pool: list[np.ndarray] = []
        self._out_bytes = self.batch_size * self.n_models * self.d_model * np.dtype(self._np_dtype).itemsize
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
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._buffers = [None, None]
        self._out_pool = []

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
        dest = buffer[slot * self.chunk_rows: slot * self.chunk_rows + hi - lo, model]
        data = self._readers[model].read(chunk, lo, hi, dest, self._scratch)
        if self.verify and data is not None:
            if not data.flags.c_contiguous:
                data = self._scratch(hi - lo)
                np.copyto(data, dest)
            got, expected = S.crc32(data), self._crcs[model][chunk]
            if got != expected:
                raise S.corrupt_chunk(self.arrays[model], chunk, lo, hi, f"fails its checksum: CRC-32 "
                                      f"{got:#010x}, recorded {expected:#010x}")

    def _schedule(self, g: int) -> _LiveWindow:
        epoch, w = divmod(g, self._order.n_windows)
        chunks = self._order.plan(epoch).windows[w]
        if self._buffers[g % 2] is None:
            self._buffers[g % 2] = aligned_empty((self.window_rows, self.n_models, self.d_model), self._np_dtype)
        buffer = self._buffers[g % 2]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.read_threads, thread_name_prefix="mdiff-read")
        futures = [self._executor.submit(self._read_chunk, m, int(self._order.chunk_ids[i]), buffer, slot)
                   for slot, i in enumerate(chunks) for m in range(self.n_models)]
        return _LiveWindow(epoch, w, buffer, self._order.rows_of_window(epoch, w, chunks)[1], futures)

    @staticmethod
    def _release(lw: _LiveWindow) -> None:
        """Make sure no read still writes into the window's buffer before it is reused."""
        for f in lw.futures:
            f.cancel()
        wait_futures(lw.futures)

    # assembling (the pipeline thread)
    def _out_buffer(self, n: int) -> tuple[np.ndarray, torch.Tensor]:
        shape = (n, self.n_models, self.d_model)
        if self.device.type == "cuda":
            # torch's pinned-memory cache reuses the block once the copy reading it has finished
            host = torch.empty(shape, dtype=torch.uint16 if self.storage_dtype == "bfloat16" else torch.float32,
                               pin_memory=True)
            return host.numpy(), host
        # A pooled buffer is free when only the pool refers to it: a yielded tensor, and any view
        # of it, refers to the pool's array (the owner of the memory) through torch.from_numpy's
        # storage. Buffers are page-aligned like the window buffers: np.take between buffers
        # aligned differently ran 3x slower here.
        owner = next((o for o in self._out_pool if sys.getrefcount(o) <= 3), None)
        if owner is None:
            owner = np.empty(self._out_bytes + 4096, np.uint8)
            if len(self._out_pool) < self.prefetch_batches + 4:
                self._out_pool.append(owner)
        start = (-owner.ctypes.data) % 4096
        out = owner[start:start + self._out_bytes].view(self._np_dtype).reshape(
            self.batch_size, self.n_models, self.d_model)[:n]
        return out, torch.from_numpy(out)

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
                host_np, host = self._out_buffer(e - s)
                pos = 0
                for w in range(w0, w1 + 1):
                    lw = live[epoch * W + w]
                    if not lw.ready:
                        for f in lw.futures:
                            f.result()  # raises a read's error here
                        lw.ready = True
                    a = max(s, int(plan.starts[w])) - int(plan.starts[w])
                    z = min(e, int(plan.starts[w + 1])) - int(plan.starts[w])
                    np.take(lw.buffer, lw.rows[a:z], axis=0, out=host_np[pos:pos + z - a], mode="clip")
                    pos += z - a
                assert pos == e - s
                if self.storage_dtype == "bfloat16":
                    host = host.view(torch.bfloat16)
                del host_np
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
