"""Training throughput on 1 vs 2 CPU processes (gloo): one process, data parallelism, and the sweep's
dictionaries split across the processes, on a tiny cached store.

Each configuration runs `mdiff train` twice as a command (torchrun for two processes), with a long and
a short number of steps; tokens/s is the extra tokens over the extra seconds, so process start-up,
the rendezvous and the final saves cancel out. On a 2-core machine shared with other jobs the two
processes compete with everything else for the same cores: read the figures as what this machine
gave, not as a scaling law. Writes its BENCHMARKS.md section and benchmarks/results/distributed.json.

Reproduce: `python -m benchmarks.bench_distributed` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common.helpers import ROOT, load_line, machine_info, machine_line, write_section
from mdiff.config import load_config
from mdiff.tiny import build_fixture, train_section, write_config
from pipeline.cache import run_cache

MODES = {"1 process": (1, "data"), "2 processes, data parallel": (2, "data"),
         "2 processes, dictionaries split": (2, "dictionaries")}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(work: Path, fx: dict, args, n: int, parallel: str, steps: int) -> float:
    name = f"b{n}-{parallel}-{steps}"
    dicts = [{"name": f"topk{i}", "architecture": "topk", "n_latents": args.latents, "k": 16, "seed": i}
             for i in range(2)]
    train = train_section(["llama-s0", "llama-s1"], dicts, steps=steps, batch_size=args.batch,
                          checkpoint_every=steps, extra={"parallel": parallel, "eval_every": steps,
                                                         "log_every": 50})
    cfg = write_config(work / f"{name}.toml", fx, n_tokens=args.tokens, hooks=((1, "resid_post"),),
                       store=str(work / "store"), name=name, train=train)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    launch = [] if n == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(n),
                                "--master_port", str(_port())]
    cmd = [sys.executable, *launch, "-m", "mdiff.cli", "train", str(cfg), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(max(1, args.threads // n)))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--short-steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in all, split over processes")
    ap.add_argument("--work", default="/tmp/mdiff-bench-distributed")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default="benchmarks/results/distributed.json")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    fx = build_fixture(work, archs=("llama",), seeds=(0, 1), n_docs=800, d_model=64, n_layers=2)
    cache_cfg = write_config(work / "cache.toml", fx, n_tokens=args.tokens, hooks=((1, "resid_post"),),
                             store=str(work / "store"), chunk_tokens=512, shard_tokens=2048)
    run_cache(load_config(cache_cfg), log=lambda *a: None, progress=False)
    before = os.getloadavg()
    rows = {}
    for label, (n, parallel) in MODES.items():
        long_s = run_once(work, fx, args, n, parallel, args.steps)
        short_s = run_once(work, fx, args, n, parallel, args.short_steps)
        tokens = (args.steps - args.short_steps) * args.batch
        rows[label] = {"processes": n, "parallel": parallel, "long_s": long_s, "short_s": short_s,
                       "tokens_per_s": tokens / max(long_s - short_s, 1e-9)}
        print(f"{label}: {rows[label]['tokens_per_s']:,.0f} tokens/s ({long_s:.1f} s / {short_s:.1f} s)", flush=True)
    machine = machine_info()
    result = {"setup": {k: getattr(args, k) for k in ("steps", "short_steps", "batch", "latents", "tokens", "threads")},
              "rows": rows, "load_before": before, "load_after": os.getloadavg(), "machine": machine}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    write_section(Path(args.out), "distributed", render(result))
    print(render(result))
    shutil.rmtree(work, ignore_errors=True)


def render(r: dict) -> str:
    s = r["setup"]
    base = r["rows"]["1 process"]["tokens_per_s"]
    lines = ["## Training on several processes (`benchmarks/bench_distributed.py`)", "",
             f"A sweep of two TopK crosscoders (2 models x d_model 64, {s['latents']:,} latents, k 16), batch "
             f"{s['batch']:,}, {s['steps']} against {s['short_steps']} steps: tokens/s is the difference of the two "
             f"runs, so start-up and saving cancel. Two processes run under torchrun over gloo, {s['threads']} "
             "torch threads shared between them.", "",
             "| configuration | tokens/s | vs 1 process |", "|---|---:|---:|"]
    for label, row in r["rows"].items():
        lines.append(f"| {label} | {row['tokens_per_s']:,.0f} | {row['tokens_per_s'] / base:.2f}x |")
    lines += ["", "This is a 2-core CPU machine shared with other jobs: the two processes split the same two cores "
              "that one process uses, so the figures show the overhead of the collectives rather than a speed-up; "
              "on N GPUs each process has its own device.",
              load_line(r["load_before"], r["load_after"]), machine_line(r["machine"]), "",
              "Raw figures: `benchmarks/results/distributed.json`. Reproduce: `python -m benchmarks.bench_distributed`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
