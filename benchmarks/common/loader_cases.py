"""The loader benchmark's stores and its measured cases, each run in a worker process of its own.

A worker builds one case's reader (a loader as training builds it, or plain reads of the same
files), then times one cold pass (the store's pages evicted first; for a loader, an epoch from a
fresh iterator, so nothing was read ahead) and one warm pass (every file read into the page cache
first; for a loader, the second epoch of a running iterator, as in training). A loader's first
epoch, untimed, touches its buffers (fresh pages cost ~1.4 ms per MiB on this VM, once per run). It
reports its process's CPU time and peak RSS: one process per case, so each case's memory is its own.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline import store as S
from trainer.loader import ActivationLoader
from trainer.readers import ShardFileReader, aligned_empty

HOOK = "layer8.resid_post"


# -- the stores -----------------------------------------------------------------------------------
def build_store(path: Path, *, rows: int, d: int, n_models: int, ctx: int, chunk: int, shard: int,
                compression: str, storage_dtype: str, seed: int = 0) -> tuple[S.TokenSet, list[S.ActivationArray]]:
    """Synthetic activations: rows of one random block, shuffled differently per shard (reused
    when the store at `path` is already complete)."""
    root = S.StoreRoot(str(path))
    root.ensure_format(create=True)
    n_seq = rows // ctx
    tsid = "ts-bench"
    if not S.token_set_complete(root, tsid):
        S.write_token_set(root, tsid, n_seq, ctx, [(np.zeros((n_seq, ctx), np.int32), np.zeros(n_seq, np.uint8))],
                          {"n_train_sequences": n_seq - max(1, n_seq // 128), "context_length": ctx})
    ts = S.open_token_set(root, tsid)
    block = None
    arrays = []
    for m in range(n_models):
        arr = S.create_activation_array(
            root, S.activation_path(tsid, f"bench-model{m}", HOOK), n_rows=n_seq * ctx, d_model=d,
            chunk_rows=chunk, shard_rows=shard, storage_dtype=storage_dtype, compression=compression,
            attrs={"scale": 1.0, "tokenset_id": tsid, "context_length": ctx, "hook": {"label": HOOK}})
        if not arr.is_complete():
            if block is None:
                block = S.encode(torch.randn(min(n_seq * ctx, shard), d, generator=torch.Generator().manual_seed(seed)),
                                 storage_dtype)
            rng = np.random.default_rng(m)
            for s in sorted(set(range(arr.n_shards)) - arr.done_shards()):
                lo, hi = arr.shard_rows_range(s)
                arr.write_shard(s, block[rng.permutation(len(block))[: hi - lo]])
            assert arr.finalize()
        arrays.append(arr)
    return ts, arrays


def open_store(path: Path) -> tuple[S.TokenSet, list[S.ActivationArray]]:
    root = S.StoreRoot(str(path))
    ts = S.open_token_set(root, "ts-bench")
    models = sorted(p.name for p in (path / "activations" / "ts-bench").iterdir() if p.is_dir())
    return ts, [S.open_activation_array(root, S.activation_path("ts-bench", m, HOOK), require_complete=True)
                for m in models]


def shard_files(arrays) -> list[str]:
    return [f"{a.root.base}/{a.path}/c/{s}/0" for a in arrays for s in range(a.n_shards)]


def evict(files: list[str]) -> str:
    """Evict the files' pages (POSIX_FADV_DONTNEED after a sync), as for a store larger than RAM.
    Only these files: a system-wide drop_caches would also stall the other jobs of a shared machine."""
    os.sync()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise(DONTNEED)"


def cache(files: list[str]) -> None:
    """Read every file once, so that all of them are in the page cache."""
    buf = memoryview(aligned_empty(16 << 20, np.uint8))
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# -- what is measured -----------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent
    through fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - not Linux


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class MemmapShardReader(ShardFileReader):
    """Variant (1b): numpy.memmap slicing of the inner chunk instead of os.preadv."""

    def read(self, chunk, lo, hi, dest, scratch):
        shard, j = divmod(chunk, self.chunks_per_shard)
        offset = int(self.index(shard)[j, 0])
        mm = np.memmap(self.shard_file(shard), dtype=dest.dtype, mode="r", offset=offset,
                       shape=(hi - lo, dest.shape[1]))
        dest[...] = mm
        del mm
        return S.crc32(memoryview(dest).cast("B")) if self.verify else None


def loader_pass(ld: ActivationLoader, it, caller_float: bool) -> dict:
    """One epoch of the training split from iterator `it`, timed to its last batch."""
    t0 = time.perf_counter()
    n = 0
    for _ in range(ld.batches_per_epoch):
        x = next(it)
        if caller_float:
            x = x.float()  # what the trainer does with each batch
        n += len(x)
        del x
    return {"seconds": time.perf_counter() - t0, "tokens": n}


def sequential_pass(files: list[str], threads: int, block: int = 16 << 20) -> dict:
    """16 MiB reads in file order into one page-aligned buffer per thread, `threads` in flight."""
    jobs = [(p, off) for p in files for off in range(0, os.path.getsize(p), block)]
    local = threading.local()

    def read(job):
        p, off = job
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = aligned_empty(block, np.uint8)
        fd = os.open(p, os.O_RDONLY)
        try:
            return os.preadv(fd, [buf], off)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    if threads == 1:
        total = sum(map(read, jobs))
    else:
        with ThreadPoolExecutor(threads) as ex:
            total = sum(ex.map(read, jobs))
    return {"seconds": time.perf_counter() - t0, "bytes": total}


def naive_pass(arrays, ts, n_rows: int) -> dict:
    """Random single rows, one at a time, from memmaps of the shard files' data (the naive way)."""
    readers = [ShardFileReader(a, a.chunk_checksums()) for a in arrays]
    a0 = arrays[0]
    d, cr = a0.d_model, a0.chunk_rows
    maps = []  # maps[model][chunk]: the chunk's rows, memory-mapped
    for r in readers:
        per_chunk = []
        for c in range(-(-a0.n_rows // cr)):
            shard, j = divmod(c, r.chunks_per_shard)
            per_chunk.append(np.memmap(r.shard_file(shard), dtype=S.NUMPY_DTYPE[a0.storage_dtype], mode="r",
                                       offset=int(r.index(shard)[j, 0]), shape=(cr, d)))
        maps.append(per_chunk)
    rows = np.random.default_rng(0).integers(0, ts.n_train_sequences * ts.context_length, n_rows)
    out = np.empty((len(arrays), d), maps[0][0].dtype)
    t0 = time.perf_counter()
    for r in rows:
        c, i = divmod(int(r), cr)
        for m in range(len(arrays)):
            out[m] = maps[m][c][i]
    return {"seconds": time.perf_counter() - t0, "tokens": n_rows}


def run_case(case: dict, setup: dict) -> dict:
    """Measure one case (a dict of CASES in bench_loader) cold and warm in this process."""
    ts, arrays = open_store(Path(case["store"]))
    files = shard_files(arrays)
    token_bytes = len(arrays) * arrays[0].d_model * np.dtype(S.NUMPY_DTYPE[arrays[0].storage_dtype]).itemsize
    all_tokens = arrays[0].n_rows
    base_rss = peak_rss_mib()
    out: dict = {}
    kind = case["kind"]
    if kind == "loader":
        evict(files)
        t0 = time.perf_counter()
        ld = ActivationLoader(arrays, ts, split="train", batch_size=setup["batch"], seed=0,
                              buffer_tokens=setup["buffer_tokens"], read_threads=setup["threads"],
                              reader=case.get("reader", "auto"), direct_io=case.get("direct_io", "auto"),
                              float32=case.get("float32"))
        if case.get("memmap"):
            ld._readers = [MemmapShardReader(a, c) for a, c in zip(arrays, ld._crcs)]
        it = iter(ld)
        next(it)
        out["first_batch_seconds"] = time.perf_counter() - t0  # a fresh loader, cold
        it.close()
        out["direct_io"], out["direct_io_reason"] = ld.direct_io, ld.direct_io_reason
        loader_pass(ld, iter(ld), False)  # touches both window buffers and the batch pool, untimed

        def prepare(temperature):
            it = iter(ld)  # cold: a fresh iterator, so nothing was read ahead before the eviction
            if temperature == "warm":  # warm: the second epoch of a running stream, as in training
                loader_pass(ld, it, False)
            return lambda: loader_pass(ld, it, case.get("caller_float", False))
    elif kind == "sequential":
        def prepare(temperature):
            def measure():
                r = sequential_pass(files, case["threads"])
                return {"seconds": r["seconds"], "tokens": r["bytes"] / token_bytes}
            return measure
    else:
        def prepare(temperature):
            return lambda: naive_pass(arrays, ts, setup["naive_rows"])
    for temperature in ("cold", "warm"):
        if temperature == "cold":
            out["cache_drop"] = evict(files)
        else:
            cache(files)
        measure = prepare(temperature)
        c0 = cpu_seconds()
        r = measure()
        r["cpu_seconds"] = cpu_seconds() - c0  # every thread of this process, user + system
        r["bytes"] = r["tokens"] * token_bytes
        out[temperature] = r
    out.update(peak_rss_mib=peak_rss_mib(), base_rss_mib=base_rss, token_bytes=token_bytes, all_tokens=all_tokens)
    return out
