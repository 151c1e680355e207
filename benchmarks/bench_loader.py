"""Stage-two loader benchmark: does the shuffled, aligned loader read as fast as the disk?

One local store of synthetic bfloat16 activations (2 models, chunks of 4,096 rows in shards of
65,536) and a second one with the same rows compressed (Blosc zstd level 1). Measured on the same
files, in one run, interleaved, with the page cache dropped before each measurement:

  (1) the shuffled training loader, reader "mmap" (direct reads from the shard files),
  (1b) the same with numpy.memmap slicing instead of os.preadv (which of the two to use),
  (1c) the same with O_DIRECT reads (direct_io=True: no page cache),
  (2) the shuffled loader, reader "zarr" (zarr decodes every chunk),
  (3) the shuffled loader, reader "zarr", on the compressed store,
  (4) plain sequential reads of the shard files, 16 MiB at a time, one stream,
  (4b) the same with as many reads in flight as the loader has read threads,
  (5) naive random single rows from memory-mapped shard files (a sample of rows).

Target: (1) / (4) >= 0.8 (also reported against (4b)). Throughput in tokens/s counts a token once with all its models' rows;
MB/s counts the bytes yielded (or read, for (4)). Absolute rates on shared VMs drift, so compare
ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common.helpers import write_section
from pipeline import store as S
from trainer.loader import ActivationLoader
from trainer.readers import ShardFileReader as _ShardFileReader
from trainer.readers import aligned_empty

HOOK = "layer8.resid_post"


# -- the store ------------------------------------------------------------------------------------
def build_store(path: Path, *, rows: int, d: int, n_models: int, ctx: int, chunk: int, shard: int,
                compression: str, block: np.ndarray) -> tuple[S.TokenSet, list[S.ActivationArray]]:
    """Synthetic bfloat16 activations: rows of one random block, shuffled differently per shard."""
    root = S.StoreRoot(str(path))
    root.ensure_format(create=True)
    n_seq = rows // ctx
    tsid = "ts-bench"
    if not S.token_set_complete(root, tsid):
        S.write_token_set(root, tsid, n_seq, ctx, [(np.zeros((n_seq, ctx), np.int32), np.zeros(n_seq, np.uint8))],
                          {"n_train_sequences": n_seq - max(1, n_seq // 128), "context_length": ctx})
    ts = S.open_token_set(root, tsid)
    arrays = []
    for m in range(n_models):
        arr = S.create_activation_array(
            root, S.activation_path(tsid, f"bench-model{m}", HOOK), n_rows=n_seq * ctx, d_model=d,
            chunk_rows=chunk, shard_rows=shard, storage_dtype="bfloat16", compression=compression,
            attrs={"scale": 1.0, "tokenset_id": tsid, "context_length": ctx, "hook": {"label": HOOK}})
        if not arr.is_complete():
            rng = np.random.default_rng(m)
            for s in sorted(set(range(arr.n_shards)) - arr.done_shards()):
                lo, hi = arr.shard_rows_range(s)
                arr.write_shard(s, block[rng.permutation(len(block))[: hi - lo]])
            assert arr.finalize()
        arrays.append(arr)
    return ts, arrays


def shard_files(arrays) -> list[str]:
    return [f"{a.root.base}/{a.path}/c/{s}/0" for a in arrays for s in range(a.n_shards)]


def drop_cache(files: list[str]) -> str:
    """Evict the store's pages: drop_caches when root, and POSIX_FADV_DONTNEED on every file."""
    os.sync()
    how = []
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        how.append("drop_caches")
    except OSError:
        pass
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    how.append("fadvise")
    return "+".join(how)


# -- measurements ---------------------------------------------------------------------------------
def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class MemmapShardReader(_ShardFileReader):
    """Variant (1b): numpy.memmap slicing of the inner chunk instead of os.preadv."""

    def read(self, chunk, lo, hi, dest, scratch):
        shard, j = divmod(chunk, self.chunks_per_shard)
        offset = int(self.index(shard)[j, 0])
        mm = np.memmap(self.shard_file(shard), dtype=dest.dtype, mode="r", offset=offset,
                       shape=(hi - lo, dest.shape[1]))
        dest[...] = mm
        del mm


class LoaderCase:
    """A long-lived loader, as in training: its buffers are allocated and touched once (untimed).

    Each measurement is one whole epoch from a fresh iterator (which drops the read-ahead of the
    previous one, so the dropped page cache really is cold), timed up to its last batch.
    """

    def __init__(self, arrays, ts, *, reader, batch, buffer_tokens, threads, memmap=False, direct_io=False):
        t0 = time.perf_counter()
        self.ld = ActivationLoader(arrays, ts, split="train", batch_size=batch, buffer_tokens=buffer_tokens,
                                   read_threads=threads, reader=reader, seed=0, direct_io=direct_io)
        if memmap:
            self.ld._readers = [MemmapShardReader(a, c) for a, c in zip(arrays, self.ld._crcs)]
        it = iter(self.ld)
        next(it)
        self.first_batch_seconds = time.perf_counter() - t0  # fresh loader, cold or not
        for _ in range(self.ld.batches_per_epoch - 1):
            next(it)  # touches both window buffers and the batch pool
        it.close()

    def __call__(self) -> dict:
        ld = self.ld
        it = iter(ld)
        t0 = time.perf_counter()
        n = sum(len(next(it)) for _ in range(ld.batches_per_epoch))
        dt = time.perf_counter() - t0
        it.close()
        return {"seconds": dt, "tokens": n, "bytes": n * ld.n_models * ld.d_model * 2}


def run_sequential(files: list[str], tokens: int, block: int = 16 << 20) -> dict:
    view = memoryview(aligned_empty(block, np.uint8))  # page-aligned, like the loader's buffers
    total = 0
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while (got := f.readinto(view)):
                total += got
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": tokens, "bytes": total}


def run_sequential_threads(files: list[str], tokens: int, threads: int, block: int = 16 << 20) -> dict:
    """Sequential too, with `threads` reads in flight: 16 MiB blocks in file order, on a pool."""
    from concurrent.futures import ThreadPoolExecutor

    blocks = [(p, off) for p in files for off in range(0, os.path.getsize(p), block)]
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
    with ThreadPoolExecutor(threads) as ex:
        total = sum(ex.map(read, blocks))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": tokens, "bytes": total}


def run_naive(arrays, ts, n_rows: int) -> dict:
    """Random single rows, one at a time, from memmaps of the shard files' data (the naive way)."""
    readers = [_ShardFileReader(a, a.chunk_checksums()) for a in arrays]
    a0 = arrays[0]
    d, cr = a0.array.shape[1], a0.chunk_rows
    maps = []  # maps[model][chunk]: the chunk's rows, memory-mapped
    for r in readers:
        per_chunk = []
        for c in range(-(-a0.n_rows // cr)):
            shard, j = divmod(c, r.chunks_per_shard)
            per_chunk.append(np.memmap(r.shard_file(shard), dtype=np.uint16, mode="r",
                                       offset=int(r.index(shard)[j, 0]), shape=(cr, d)))
        maps.append(per_chunk)
    rows = np.random.default_rng(0).integers(0, ts.n_train_sequences * ts.context_length, n_rows)
    out = np.empty((len(arrays), d), np.uint16)
    t0 = time.perf_counter()
    for r in rows:
        c, i = divmod(int(r), cr)
        for m in range(len(arrays)):
            out[m] = maps[m][c][i]
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": n_rows, "bytes": n_rows * len(arrays) * d * 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="uncompressed store size (both models)")
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--shard", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--buffer-tokens", type=int, default=65536, help="shuffle window (memory: 2 windows)")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--naive-rows", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/mdiff-bench-loader", help="stores live here (reused if present)")
    ap.add_argument("--keep", action="store_true", help="keep the stores for the next run")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default="benchmarks/results/loader.json")
    args = ap.parse_args()

    d, n_models = args.d_model, args.models
    row_bytes = n_models * d * 2
    rows = int(args.gib * 2**30 / row_bytes) // args.ctx * args.ctx
    work = Path(args.work)
    t0 = time.perf_counter()
    block = torch.randn(min(rows, args.shard), d).to(torch.bfloat16).view(torch.uint16).numpy()
    geometry = {"rows": rows, "d": d, "n_models": n_models, "ctx": args.ctx, "chunk": args.chunk,
                "shard": args.shard}
    ts, arrays = build_store(work / "plain", compression="none", block=block, **geometry)
    zts, zarrays = build_store(work / "zstd", compression="zstd", block=block, **geometry)
    del block
    build_s = time.perf_counter() - t0
    files, zfiles = shard_files(arrays), shard_files(zarrays)
    plain_bytes = sum(os.path.getsize(p) for p in files)
    zstd_bytes = sum(os.path.getsize(p) for p in zfiles)
    print(f"stores ready in {build_s:.0f}s: {rows:,} tokens x {n_models} models x d {d}: "
          f"{plain_bytes / 2**30:.2f} GiB plain, {zstd_bytes / 2**30:.2f} GiB zstd", flush=True)

    lkw = {"batch": args.batch, "buffer_tokens": args.buffer_tokens, "threads": args.threads}
    load_before = os.getloadavg()
    # loaders are built (and their buffers touched) untimed, each after a cache drop
    first_batch = {}
    loaders = {}
    for name, store, kw in [("loader_mmap", (arrays, ts), {"reader": "mmap"}),
                            ("loader_memmap_slicing", (arrays, ts), {"reader": "mmap", "memmap": True}),
                            ("loader_mmap_direct", (arrays, ts), {"reader": "mmap", "direct_io": True}),
                            ("loader_zarr", (arrays, ts), {"reader": "zarr"}),
                            ("loader_zarr_zstd", (zarrays, zts), {"reader": "zarr"})]:
        drop_cache(zfiles if "zstd" in name else files)
        loaders[name] = LoaderCase(*store, **kw, **lkw)
        first_batch[name] = loaders[name].first_batch_seconds
    cases = {
        **loaders,
        "sequential": lambda: run_sequential(files, rows),
        "sequential_threads": lambda: run_sequential_threads(files, rows, args.threads),
        "naive_random_rows": lambda: run_naive(arrays, ts, args.naive_rows),
    }
    runs = {k: [] for k in cases}
    cache_drop = ""
    for rep in range(args.repeats):
        for name, fn in cases.items():
            cache_drop = drop_cache(zfiles if "zstd" in name else files)
            c0 = cpu_seconds()
            r = fn()
            r["cpu_seconds"] = cpu_seconds() - c0  # all threads of this process, user + system
            runs[name].append(r)
            print(f"  [{rep + 1}/{args.repeats}] {name}: {r['tokens'] / r['seconds']:,.0f} tokens/s, "
                  f"{r['bytes'] / r['seconds'] / 1e6:,.0f} MB/s", flush=True)
    # warm: everything in the page cache (shows the CPU cost of each reader)
    warm = {}
    for name in ("loader_mmap", "loader_mmap_direct", "loader_zarr", "sequential", "sequential_threads"):
        cases[name]()
        warm[name] = cases[name]()

    def rate(rs, key):
        return statistics.median(r[key] / r["seconds"] for r in rs)

    tps = {k: rate(v, "tokens") for k, v in runs.items()}
    mbs = {k: rate(v, "bytes") / 1e6 for k, v in runs.items()}
    cpu = {k: statistics.median(r["cpu_seconds"] / r["tokens"] * 1e6 for r in v) for k, v in runs.items()}
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "numpy": np.__version__,
                    "zarr": __import__("zarr").__version__},
        "setup": {**geometry, "storage_dtype": "bfloat16", "batch": args.batch,
                  "buffer_tokens": args.buffer_tokens, "read_threads": args.threads,
                  "repeats": args.repeats, "naive_rows": args.naive_rows, "cache_drop": cache_drop,
                  "plain_bytes": plain_bytes, "zstd_bytes": zstd_bytes, "build_seconds": build_s},
        "runs": runs,
        "tokens_per_s": tps,
        "mb_per_s": mbs,
        "cpu_seconds_per_million_tokens": cpu,
        "warm_tokens_per_s": {k: v["tokens"] / v["seconds"] for k, v in warm.items()},
        "first_batch_seconds": first_batch,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "ratio_loader_vs_sequential": tps["loader_mmap"] / tps["sequential"],
        "ratio_loader_vs_sequential_threads": tps["loader_mmap"] / tps["sequential_threads"],
        "ratio_zarr_vs_mmap": tps["loader_zarr"] / tps["loader_mmap"],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    write_section(Path(args.out), "loader", render(result))
    print(render(result))
    for case in loaders.values():
        case.ld.close()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def render(r: dict) -> str:
    m, s, t, mb, w = r["machine"], r["setup"], r["tokens_per_s"], r["mb_per_s"], r["warm_tokens_per_s"]
    la, fb, cpu = r["load_average"], r["first_batch_seconds"], r["cpu_seconds_per_million_tokens"]
    seq, seq_t = t["sequential"], t["sequential_threads"]
    rows = [
        ("(1) shuffled loader, reader `mmap` (os.preadv from the shard files): the default", "loader_mmap"),
        ("(1b) the same, numpy.memmap slicing instead of preadv", "loader_memmap_slicing"),
        ("(1c) the same, preadv with O_DIRECT (`direct_io=True`, no page cache)", "loader_mmap_direct"),
        ("(2) shuffled loader, reader `zarr` (zarr decodes each chunk)", "loader_zarr"),
        ("(3) shuffled loader, reader `zarr`, Blosc-zstd1 store", "loader_zarr_zstd"),
        ("(4) sequential 16 MiB reads of the shard files, one stream", "sequential"),
        (f"(4b) the same, {s['read_threads']} reads in flight (the loader's parallelism)", "sequential_threads"),
        (f"(5) naive random single rows from memmaps ({s['naive_rows']:,} sampled)", "naive_random_rows"),
    ]
    table = "\n".join(
        f"| {label} | {t[k]:,.0f} | {mb[k]:,.0f} | {t[k] / seq:.2f} | {t[k] / seq_t:.2f} | {cpu[k]:.1f} | "
        + (f"{w[k]:,.0f} |" if k in w else " |") for label, k in rows)
    return f"""## Stage two: the shuffled, aligned loader vs plain reads

Machine: CPU, {m['cpu_count']} cores; {m['platform']}; Python {m['python']}, numpy {m['numpy']},
zarr {m['zarr']}, torch {m['torch']}. Store: {s['rows']:,} tokens x {s['n_models']} models x d_model
{s['d']}, bfloat16, chunks of {s['chunk']:,} rows in shards of {s['shard']:,}
({s['plain_bytes'] / 2**30:.2f} GiB; the zstd copy {s['zstd_bytes'] / 2**30:.2f} GiB). Loader: batch
{s['batch']:,}, shuffle window {s['buffer_tokens']:,} tokens, {s['read_threads']} read threads; each loader is
built once (its buffers touched, untimed) and each measurement is one epoch of the training split
from a fresh iterator, as in a long run. Page cache dropped before each measurement
({s['cache_drop']}); median of {s['repeats']} interleaved runs; "warm" = everything already cached,
one run. Load average {la['before'][0]:.1f} before, {la['after'][0]:.1f} after: other jobs shared these 2 cores.

| what | tokens/s | MB/s | vs (4) | vs (4b) | CPU s per 1M tokens | warm tokens/s |
|---|---:|---:|---:|---:|---:|---:|
{table}

Loader / sequential: **{r['ratio_loader_vs_sequential']:.2f}** against one sequential stream (target >= 0.8),
**{r['ratio_loader_vs_sequential_threads']:.2f}** against sequential reads with the loader's parallelism.
zarr / mmap reader: {r['ratio_zarr_vs_mmap']:.2f}. First batch of a fresh loader, cold (it reads a whole
window first): {fb['loader_mmap']:.1f} s with `mmap`, {fb['loader_zarr']:.1f} s with `zarr`. A token is
{s['n_models']} rows of {s['d'] * 2:,} bytes. Raw figures: `benchmarks/results/loader.json`.
Reproduce: `python -m benchmarks.bench_loader` (about 2.5 minutes).
"""


if __name__ == "__main__":
    main()
