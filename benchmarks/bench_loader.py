"""Stage-two loader benchmark: does the shuffled, aligned loader read as fast as the disk, and as
fast as memory when the store is in the page cache?

Three local stores of synthetic activations (2 models x d_model 2048, chunks of 4,096 rows in
shards of 65,536): bfloat16, the same rows compressed (Blosc zstd level 1), and float32 of the same
size in bytes (half the tokens). Each case runs in a worker process of its own
(benchmarks/common/loader_cases.py), one after the other in an order reversed every repeat, and is
measured cold (the store's pages evicted first) and warm (all of it in the page cache):

  (1) the shuffled training loader as training builds it (reader "mmap", direct_io "auto"),
  (1b) the same with numpy.memmap slicing instead of os.preadv,
  (1c) the same with direct_io "always" (O_DIRECT for what the page cache does not hold),
  (1d) the same with direct_io "never" (buffered reads through the page cache),
  (1e) the same with float32=True (bfloat16 batches converted to float32 in the loader),
  (1f) the same with batch.float() by the caller instead (fresh 64 MiB float32 tensors),
  (1g) the loader on the float32 store,
  (2) reader "zarr" (zarr decodes every chunk), (3) the same on the zstd store,
  (4) plain sequential reads of the bfloat16 shard files, 16 MiB at a time, one stream,
  (4b) the same with as many reads in flight as the loader has read threads,
  (5) naive random single rows from memory-mapped shard files (a sample of rows).

Targets: cold (1) / (4b) >= 0.9; warm (1) / (4) >= 0.5; (1) >= (1g) in MB/s. Ratios are medians
of per-repeat ratios (each repeat runs every case once, side by side); absolute rates on shared
VMs drift. Throughput in tokens/s counts a token once with all its models' rows; MB/s counts the
stored bytes yielded (or read, for (4)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common.helpers import ROOT, alternating, paired_ratio, write_section
from benchmarks.common.loader_cases import build_store, run_case, shard_files

CASES = {  # name: (label, case); the store is filled in from its key
    "loader": ("(1) shuffled loader, reader `mmap`, `direct_io=\"auto\"`: the default", {"kind": "loader"}),
    "loader_memmap_slicing": ("(1b) the same, numpy.memmap slicing instead of preadv",
                              {"kind": "loader", "memmap": True, "direct_io": "never"}),
    "loader_direct": ("(1c) the same, `direct_io=\"always\"` (O_DIRECT for what is not cached)",
                      {"kind": "loader", "direct_io": "always"}),
    "loader_buffered": ("(1d) the same, `direct_io=\"never\"` (through the page cache)",
                        {"kind": "loader", "direct_io": "never"}),
    "loader_float32_out": ("(1e) the same, `float32=True` (converted to float32 in the loader)",
                           {"kind": "loader", "float32": True}),
    "loader_caller_float": ("(1f) the same, `batch.float()` by the caller instead",
                            {"kind": "loader", "caller_float": True}),
    "loader_f32_store": ("(1g) the loader (1) on the float32 store (same bytes, half the tokens)",
                         {"kind": "loader", "store": "float32"}),
    "loader_zarr": ("(2) shuffled loader, reader `zarr` (zarr decodes each chunk)", {"kind": "loader", "reader": "zarr"}),
    "loader_zarr_zstd": ("(3) shuffled loader, reader `zarr`, Blosc-zstd1 store",
                         {"kind": "loader", "reader": "zarr", "store": "zstd"}),
    "sequential": ("(4) sequential 16 MiB reads of the shard files, one stream", {"kind": "sequential", "threads": 1}),
    "sequential_threads": ("(4b) the same, {threads} reads in flight (the loader's parallelism)",
                           {"kind": "sequential", "threads": "threads"}),
    "naive_random_rows": ("(5) naive random single rows from memmaps ({naive_rows:,} sampled)", {"kind": "naive"}),
}


def worker(spec: str) -> None:
    job = json.loads(spec)
    print(json.dumps(run_case(job["case"], job["setup"])), flush=True)


def run_worker(case: dict, setup: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_loader", "--worker", json.dumps({"case": case, "setup": setup})]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{p.stdout[-2000:]}{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="uncompressed size of each store (both models)")
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
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--work", default="/tmp/mdiff-bench-loader", help="stores live here (reused if present)")
    ap.add_argument("--keep", action="store_true", help="keep the stores for the next run")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default="benchmarks/results/loader.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)

    d, n_models, work = args.d_model, args.models, Path(args.work)
    t0 = time.perf_counter()
    geometry = {"d": d, "n_models": n_models, "ctx": args.ctx, "chunk": args.chunk, "shard": args.shard}
    stores, sizes = {}, {}
    for name, dtype, compression in [("bfloat16", "bfloat16", "none"), ("zstd", "bfloat16", "zstd"),
                                     ("float32", "float32", "none")]:
        row_bytes = n_models * d * (2 if dtype == "bfloat16" else 4)
        rows = int(args.gib * 2**30 / row_bytes) // args.ctx * args.ctx
        _, arrays = build_store(work / name, rows=rows, compression=compression, storage_dtype=dtype, **geometry)
        stores[name] = str(work / name)
        sizes[name] = {"rows": rows, "bytes": sum(os.path.getsize(p) for p in shard_files(arrays))}
    build_s = time.perf_counter() - t0
    print(f"stores ready in {build_s:.0f}s: " + ", ".join(f"{k} {v['rows']:,} tokens {v['bytes'] / 2**30:.2f} GiB"
                                                          for k, v in sizes.items()), flush=True)

    setup = {"batch": args.batch, "buffer_tokens": args.buffer_tokens, "threads": args.threads,
             "naive_rows": args.naive_rows}
    names = [n for n in args.cases.split(",") if n]
    unknown = set(names) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep, order in alternating(names, args.repeats):
        for name in order:
            case = dict(CASES[name][1])
            case["store"] = stores[case.get("store", "bfloat16")]
            if case.get("threads") == "threads":
                case["threads"] = args.threads
            r = run_worker(case, setup)
            runs[name].append(r)
            print(f"  [{rep + 1}/{args.repeats}] {name}: cold {r['cold']['tokens'] / r['cold']['seconds']:,.0f}, "
                  f"warm {r['warm']['tokens'] / r['warm']['seconds']:,.0f} tokens/s, "
                  f"peak RSS {r['peak_rss_mib']:,.0f} MiB", flush=True)
    result = summarize(runs, args, setup, geometry, sizes, build_s, load_before)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    write_section(Path(args.out), "loader", render(result))
    print(render(result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def summarize(runs, args, setup, geometry, sizes, build_s, load_before) -> dict:
    def med(name, temp, key):
        return statistics.median(r[temp][key] / r[temp]["seconds"] for r in runs[name])

    def ratio(a, b, temp, key="tokens"):
        if a not in runs or b not in runs:
            return None
        return paired_ratio([r[temp][key] / r[temp]["seconds"] for r in runs[a]],
                            [r[temp][key] / r[temp]["seconds"] for r in runs[b]])

    per_case = {}
    for name, rs in runs.items():
        per_case[name] = {
            **{f"{t}_tokens_per_s": med(name, t, "tokens") for t in ("cold", "warm")},
            **{f"{t}_mb_per_s": med(name, t, "bytes") / 1e6 for t in ("cold", "warm")},
            **{f"{t}_cpu_seconds_per_million_tokens": statistics.median(
                r[t]["cpu_seconds"] / r[t]["tokens"] * 1e6 for r in rs) for t in ("cold", "warm")},
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
            "base_rss_mib": statistics.median(r["base_rss_mib"] for r in rs),
            **({"first_batch_seconds": statistics.median(r["first_batch_seconds"] for r in rs),
                "direct_io": rs[0]["direct_io"], "direct_io_reason": rs[0]["direct_io_reason"]}
               if "first_batch_seconds" in rs[0] else {}),
        }
        for t in ("cold", "warm"):
            per_case[name][f"{t}_vs_sequential"] = ratio(name, "sequential", t)
            per_case[name][f"{t}_vs_sequential_threads"] = ratio(name, "sequential_threads", t)
    return {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "numpy": np.__version__,
                    "zarr": __import__("zarr").__version__},
        "setup": {**geometry, **setup, "repeats": args.repeats, "stores": sizes, "build_seconds": build_s,
                  "cache_drop": next(iter(runs.values()))[0]["cache_drop"]},
        "cases": per_case,
        "runs": runs,
        "ratios": {"warm_bf16_vs_f32_mb_per_s": ratio("loader", "loader_f32_store", "warm", "bytes"),
                   "cold_bf16_vs_f32_mb_per_s": ratio("loader", "loader_f32_store", "cold", "bytes"),
                   "warm_float32_out_vs_caller_float": ratio("loader_float32_out", "loader_caller_float", "warm"),
                   "zarr_vs_mmap_cold": ratio("loader_zarr", "loader", "cold")},
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }


def render(r: dict) -> str:
    m, s, c, q = r["machine"], r["setup"], r["cases"], r["ratios"]
    la = r["load_average"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = []
    for name, (label, _) in CASES.items():
        if name not in c:
            continue
        x = c[name]
        lines.append(
            f"| {label.format(threads=s['threads'], naive_rows=s['naive_rows'])} "
            f"| {x['cold_tokens_per_s']:,.0f} | {x['cold_mb_per_s']:,.0f} | {f(x['cold_vs_sequential_threads'], '.2f')} "
            f"| {x['cold_cpu_seconds_per_million_tokens']:.1f} "
            f"| {x['warm_tokens_per_s']:,.0f} | {x['warm_mb_per_s']:,.0f} | {f(x['warm_vs_sequential'], '.2f')} "
            f"| {x['warm_cpu_seconds_per_million_tokens']:.1f} | {x['peak_rss_mib']:,.0f} |")
    bf, f32 = s["stores"]["bfloat16"], s["stores"]["float32"]
    d1 = c.get("loader", {})
    key = ""
    if d1:
        key = (f"Cold, the default loader reads at **{f(d1['cold_vs_sequential_threads'], '.2f')}x** sequential "
               f"reads with its parallelism (4b) (target >= 0.9); warm, at **{f(d1['warm_vs_sequential'], '.2f')}x** "
               f"one sequential stream (4) (target >= 0.5). Its `direct_io=\"auto\"` chose: "
               f"{d1['direct_io_reason']}. ")
    if q["warm_bf16_vs_f32_mb_per_s"] is not None:
        key += (f"bfloat16 / float32 store in MB/s: {q['warm_bf16_vs_f32_mb_per_s']:.2f} warm, "
                f"{q['cold_bf16_vs_f32_mb_per_s']:.2f} cold. ")
    if q["warm_float32_out_vs_caller_float"] is not None:
        key += (f"float32 batches made by the loader (1e) / by the caller's `.float()` (1f), warm: "
                f"{q['warm_float32_out_vs_caller_float']:.2f}x. ")
    first = f"First batch of a fresh loader, cold (it reads a whole window first): {d1['first_batch_seconds']:.1f} s. " \
        if d1 else ""
    return f"""## Stage two: the shuffled, aligned loader vs plain reads

Machine: CPU, {m['cpu_count']} cores; {m['platform']}; Python {m['python']}, numpy {m['numpy']},
zarr {m['zarr']}, torch {m['torch']}. Stores: {s['n_models']} models x d_model {s['d']}, chunks of
{s['chunk']:,} rows in shards of {s['shard']:,}: bfloat16 {bf['rows']:,} tokens ({bf['bytes'] / 2**30:.2f} GiB),
its zstd copy ({s['stores']['zstd']['bytes'] / 2**30:.2f} GiB), float32 {f32['rows']:,} tokens
({f32['bytes'] / 2**30:.2f} GiB). Loader: batch {s['batch']:,}, shuffle window {s['buffer_tokens']:,} tokens,
{s['threads']} read threads. Each case runs in a process of its own: its loader is built and its buffers
touched by one untimed epoch; cold, it reads an epoch of the training split from a fresh iterator, the
store's pages evicted ({s['cache_drop']}); warm, every file in the page cache, the second epoch of a
running iterator (as in training). Peak RSS is that process's (VmHWM). Median of {s['repeats']} repeats, cases side by side in alternating order; ratios are
medians of per-repeat ratios. Load average {la['before'][0]:.1f} before, {la['after'][0]:.1f} after: other
jobs shared these cores, so absolute rates drift.

| what | cold tokens/s | cold MB/s | cold vs (4b) | cold CPU s / 1M tokens | warm tokens/s | warm MB/s | warm vs (4) | warm CPU s / 1M tokens | peak RSS MiB |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(lines)}

{key}{first}A bfloat16 token is {s['n_models']} rows of {s['d'] * 2:,} bytes. Raw figures:
`benchmarks/results/loader.json`. Reproduce: `python -m benchmarks.bench_loader` (about 6 minutes, building the stores included).
"""


if __name__ == "__main__":
    main()
