"""Stage-two training benchmark: our training step vs dictionary_learning's and SAELens', on the same
tensors.

Run it with the peers' environment (the project plus the peer toolkits, apart from .venv):

    bash benchmarks/peer_env.sh && .venv-peers/bin/python -m benchmarks.bench_train

What is measured (float32 synthetic activations, the very same tensors for both sides, batch 4,096,
k 32, Adam with the same lr and betas, no lr warm-up, torch.set_num_threads(2) for both):

  * one training step, ours (`trainer.train.train_step`, the step `mdiff train` runs) vs
    dictionary_learning's trainer `update(step, x)` (what its `trainSAE` calls), for
    TopK (AutoEncoderTopK / TopKTrainer), ReLU + L1 (AutoEncoder / StandardTrainer),
    BatchTopK (BatchTopKSAE / BatchTopKTrainer), and TopK with AuxK running every step
    (every latent counted dead), at d_model 128 and (TopK) 512, 2,048 latents
    (16,384 with --large-latents); and vs SAELens' `SAETrainer.step(x)` (what its `fit` and its
    `MultiSAETrainer` call) for TopK (TopKTrainingSAE), standard L1 (StandardTrainingSAE) and TopK
    with AuxK every step; plus a diagnostic, not shipped: our step with the TopK loss pared down
    to dictionary_learning's work, to show where any gap comes from;
  * lockstep, in memory: 4 TopK dictionaries (seeds 0-3) fed the same batch each step, ours
    (the loop of `run_train`) vs dictionary_learning's `trainSAE` with 4 trainer configs and vs
    4 SAELens trainers stepped as its `MultiSAETrainer.fit` steps them, and each against one
    dictionary;
  * lockstep end to end through our loader: a small bfloat16 store (pipeline.store), a sweep of 4
    reading it once vs 4 separate single runs each reading it, page cache dropped before each run
    (as for a store larger than RAM), with the time spent waiting for data split out.

Warm-up rounds are not timed (the first steps allocate Adam state; dictionary_learning's step 0
computes a geometric median). Cases are interleaved step by step: each round runs one step of every
case on the same batch, the order reversed every other round (trainSAE, which owns its loop, steps
between rounds through its data generator). tokens/s = batch / median step time; every ratio is the
median over rounds of the ratio measured within one round. Both wall-clock and process CPU time are
recorded: the machine is shared, and the CPU-time ratio is the steadier of the two when other jobs
compete for the 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # trainSAE's progress bar
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np
import torch

from benchmarks.common.helpers import RESULTS, ROOT, drop_page_cache, write_section
from benchmarks.training.cases import (
    Ours,
    OursPared,
    Peer,
    PeerLockstep,
    SAELensPeer,
    make_pool,
    run_rounds,
    summarize,
    train_spec,
)
from benchmarks.training.report import derive, render
from pipeline import store as S
from trainer.config import DictionarySpec
from trainer.loader import ActivationLoader
from trainer.train import new_member, train_step

# -- end to end through our loader ----------------------------------------------------------------
HOOK = "bench.resid_post"


def build_store(path: Path, *, tokens: int, d: int, ctx: int, chunk: int, shard: int):
    """One model's bfloat16 activations at one hook, written through pipeline.store."""
    shutil.rmtree(path, ignore_errors=True)
    root = S.StoreRoot(str(path))
    root.ensure_format(create=True)
    n_seq = tokens // ctx
    tsid = "ts-bench-train"
    S.write_token_set(root, tsid, n_seq, ctx,
                      [(np.zeros((n_seq, ctx), np.int32), np.zeros(n_seq, np.uint8))],
                      {"n_train_sequences": n_seq, "context_length": ctx})
    ts = S.open_token_set(root, tsid)
    arr = S.create_activation_array(
        root, S.activation_path(tsid, "bench-model", HOOK), n_rows=n_seq * ctx, d_model=d,
        chunk_rows=chunk, shard_rows=shard, storage_dtype="bfloat16", compression="none",
        attrs={"scale": 1.0, "tokenset_id": tsid, "context_length": ctx, "hook": {"label": HOOK}})
    pool = make_pool(1, min(shard, n_seq * ctx), d, seed=1)[0]
    g = torch.Generator().manual_seed(2)
    for s in range(arr.n_shards):
        lo, hi = arr.shard_rows_range(s)
        rows = pool[torch.randperm(len(pool), generator=g)[: hi - lo]]
        arr.write_shard(s, S.encode(rows, "bfloat16"))
    assert arr.finalize()
    os.sync()  # clean pages, so that drop_cache can evict them
    files = [str(p) for p in (path / S.activation_path(tsid, "bench-model", HOOK) / "c").rglob("*")
             if p.is_file()]
    return ts, [arr], files


def drop_cache(files: list[str]) -> str:
    """Evict the store's pages from the page cache: POSIX_FADV_DONTNEED on each of its files.

    Only our files: a system-wide drop_caches would also stall the other jobs on this shared
    machine, and a run right after one would get the cores to itself (it skews the comparison).
    """
    drop_page_cache(files)
    return "posix_fadvise(DONTNEED) on the store's files"


def e2e_run(arrays, ts, files, *, seeds: list[int], steps: int, d: int, latents: int, k: int,
            lr: float, batch: int, buffer_tokens: int, read_threads: int) -> dict:
    """One training run as run_train does it: a fresh loader (cold page cache) feeding
    len(seeds) fresh TopK dictionaries in lockstep for `steps` steps. Time waiting for data
    (loader construction, next(), bfloat16 -> float32) is split out."""
    drop_cache(files)
    train = dataclasses.replace(train_spec(lr), batch_size=batch, buffer_tokens=buffer_tokens,
                                read_threads=read_threads)
    w0, c0 = time.perf_counter(), time.process_time()
    members = [new_member(DictionarySpec(name=f"t{s}", architecture="topk", n_latents=latents,
                                          k=k, seed=s), train, 1, d, [1.0], "cpu") for s in seeds]
    t = time.perf_counter()
    loader = ActivationLoader(arrays, ts, split="train", batch_size=batch, seed=0,
                              buffer_tokens=buffer_tokens, read_threads=read_threads, device="cpu")
    batches = iter(loader)
    data_s = time.perf_counter() - t
    for step in range(steps):
        t = time.perf_counter()
        x = next(batches).float()
        data_s += time.perf_counter() - t
        for m in members:
            train_step(m, x, step, train)
    wall = time.perf_counter() - w0
    cpu = time.process_time() - c0
    loader.close()
    return {"wall_s": wall, "cpu_s": cpu, "data_s": data_s, "steps": steps,
            "dictionaries": len(seeds)}


def run_e2e(args, d: int, log) -> dict:
    work = Path(args.work)
    tokens = args.e2e_store_batches * args.batch
    t0 = time.perf_counter()
    ts, arrays, files = build_store(work / "store", tokens=tokens, d=d, ctx=128, chunk=4096,
                                    shard=65536)
    build_s = time.perf_counter() - t0
    kw = {"steps": args.e2e_steps, "d": d, "latents": args.latents, "k": args.k, "lr": args.lr,
          "batch": args.batch, "buffer_tokens": args.e2e_buffer_tokens,
          "read_threads": args.read_threads}
    n = args.sweep
    runs = {"lockstep": [], "separate": []}
    cache_drop = ""
    for rep in range(args.e2e_repeats):
        order = ["lockstep", "separate"] if rep % 2 == 0 else ["separate", "lockstep"]
        for mode in order:
            if mode == "lockstep":
                r = e2e_run(arrays, ts, files, seeds=list(range(n)), **kw)
            else:
                parts = [e2e_run(arrays, ts, files, seeds=[s], **kw) for s in range(n)]
                r = {key: sum(p[key] for p in parts) for key in ("wall_s", "cpu_s", "data_s")}
                r.update(steps=args.e2e_steps, dictionaries=n, runs=parts)
            runs[mode].append(r)
            log(f"  [e2e {rep + 1}/{args.e2e_repeats}] {mode}: {r['wall_s']:.1f} s wall, "
                f"{r['data_s']:.2f} s waiting for data, {r['cpu_s']:.1f} CPU-s")
        cache_drop = drop_cache(files)
    med = {m: {key: statistics.median(r[key] for r in rs) for key in ("wall_s", "cpu_s", "data_s")}
           for m, rs in runs.items()}
    shutil.rmtree(work, ignore_errors=True)
    return {"d_model": d, "store_tokens": tokens, "storage_dtype": "bfloat16",
            "store_bytes": tokens * d * 2, "build_s": build_s, "cache_drop": cache_drop,
            "buffer_tokens": args.e2e_buffer_tokens, "read_threads": args.read_threads,
            "steps_per_run": args.e2e_steps, "sweep": n, "runs": runs, "median": med,
            # paired: lockstep and separate of the same repeat, then the median over repeats
            "ratio_wall_lockstep_vs_separate": statistics.median(
                a["wall_s"] / b["wall_s"] for a, b in zip(runs["lockstep"], runs["separate"], strict=True)),
            "ratio_cpu_lockstep_vs_separate": statistics.median(
                a["cpu_s"] / b["cpu_s"] for a, b in zip(runs["lockstep"], runs["separate"], strict=True)),
            "data_s_saved": statistics.median(
                b["data_s"] - a["data_s"] for a, b in zip(runs["lockstep"], runs["separate"], strict=True))}


# -- main -----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-model-large", type=int, default=512, help="TopK only; 0 to skip")
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--large-latents", type=int, default=0,
                    help="also TopK at this many latents (e.g. 16384; slow on CPU)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rounds", type=int, default=12,
                    help="timed rounds (one step of every case each) at --d-model")
    ap.add_argument("--rounds-large", type=int, default=6, help="timed rounds for the larger settings")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--e2e-repeats", type=int, default=3)
    ap.add_argument("--sweep", type=int, default=4, help="dictionaries in the lockstep cases")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both sides")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end loader sweep")
    ap.add_argument("--e2e-steps", type=int, default=4)
    ap.add_argument("--e2e-store-batches", type=int, default=32)
    ap.add_argument("--e2e-buffer-tokens", type=int, default=16384)
    ap.add_argument("--read-threads", type=int, default=4)
    ap.add_argument("--work", default="/tmp/mdiff-bench-train")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--json", default=str(RESULTS / "train.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    groups = {}
    k, lr, n = args.k, args.lr, args.sweep
    d = args.d_model
    pool = make_pool(4, args.batch, d)
    log(f"d_model {d}, {args.latents} latents: building")
    cases = {
        "topk/ours": Ours("topk", d, args.latents, k, lr),
        "topk/dl": Peer("topk", d, args.latents, k, lr),
        "topk/saelens": SAELensPeer("topk", d, args.latents, k, lr, batch=args.batch),
        "topk_pared/ours": OursPared("topk", d, args.latents, k, lr),
        "relu/ours": Ours("relu", d, args.latents, k, lr),
        "relu/dl": Peer("relu", d, args.latents, k, lr),
        "relu/saelens": SAELensPeer("relu", d, args.latents, k, lr, batch=args.batch),
        "batchtopk/ours": Ours("batchtopk", d, args.latents, k, lr),
        "batchtopk/dl": Peer("batchtopk", d, args.latents, k, lr),
        "topk_auxk/ours": Ours("topk", d, args.latents, k, lr, aux_every_step=True),
        "topk_auxk/dl": Peer("topk", d, args.latents, k, lr, aux_every_step=True),
        "topk_auxk/saelens": SAELensPeer("topk", d, args.latents, k, lr, aux_every_step=True,
                                         batch=args.batch),
        f"lockstep{n}/ours": Ours("topk", d, args.latents, k, lr, n=n),
        f"lockstep{n}/dl": PeerLockstep(d, args.latents, k, lr, n),
        f"lockstep{n}/saelens": SAELensPeer("topk", d, args.latents, k, lr, n=n, batch=args.batch),
    }
    # warm-up rounds first: Adam's state, the peer's geometric median at its step 0
    times = run_rounds(f"d{d}", cases, pool, rounds=args.rounds, warmup=args.warmup, log=log)
    groups[f"d{d}"] = {"d_model": d, "latents": args.latents,
                       "cases": {key: summarize(v, args.batch) for key, v in times.items()}}
    del cases, pool

    large = []
    if args.d_model_large:
        large.append((args.d_model_large, args.latents))
    if args.large_latents:
        large.append((d, args.large_latents))
    for dl, ml in large:
        pool = make_pool(4, args.batch, dl)
        log(f"d_model {dl}, {ml} latents: building")
        cases = {"topk/ours": Ours("topk", dl, ml, k, lr), "topk/dl": Peer("topk", dl, ml, k, lr),
                 "topk/saelens": SAELensPeer("topk", dl, ml, k, lr, batch=args.batch)}
        times = run_rounds(f"d{dl}-m{ml}", cases, pool, rounds=args.rounds_large,
                           warmup=args.warmup, log=log)
        groups[f"d{dl}" if ml == args.latents else f"d{dl}_m{ml}"] = {
            "d_model": dl, "latents": ml,
            "cases": {key: summarize(v, args.batch) for key, v in times.items()}}
        del cases, pool

    e2e = None
    if not args.no_e2e:
        log(f"end to end: a sweep of {n} through the loader vs {n} separate runs")
        e2e = run_e2e(args, d, log)

    from importlib.metadata import version
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "dictionary_learning": version("dictionary-learning"),
                    "sae_lens": version("sae-lens"),
                    **_git_state(),
                    "numpy": np.__version__},
        "setup": {"batch": args.batch, "k": k, "lr": lr, "adam_betas": [0.9, 0.999],
                  "rounds": args.rounds, "rounds_large": args.rounds_large,
                  "warmup_rounds": args.warmup, "e2e_repeats": args.e2e_repeats, "sweep": n,
                  "data": "synthetic float32, unit mean squared norm, 4 batches cycled"},
        "groups": groups,
        "e2e": e2e,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "seconds": time.perf_counter() - t_start,
    }
    derive(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    body = render(result)
    write_section(Path(args.out), "train", body)
    print(body)
    log("done")


def _git_state() -> dict:
    """The commit measured, and whether trainer/ differed from it (read-only git calls)."""
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "trainer", "pipeline")
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "trainer_dirty": " plus uncommitted changes to trainer/ or pipeline/" if dirty else ""}


if __name__ == "__main__":
    main()
