"""Training step, dense vs sparse decode: `trainer.train.train_step` on the same batches, with the
TopK step's codes decoded densely (`sparse_decode = False`) and sparsely (`True`).

Run it with the project's environment:

    .venv/bin/python -m benchmarks.bench_train_step             # the target size and the crossover
    .venv/bin/python -m benchmarks.bench_train_step --quick     # small sizes only (a minute)

Two parts:

  * the target size (d_model 2048, 16,384 latents, k 32, batch 4,096; TopK SAE, no dead latents,
    and BatchTopK): one warm-up step per side, then `--rounds` rounds of one step each, the order
    reversed every other round; tokens/s from the median step, ratios the median of the per-round
    ratios, in wall time and in process CPU time (the steadier one on a shared machine);
  * the crossover behind `trainer.sparse_decode.prefers_sparse`: TopK steps at smaller sizes with
    k / n_latents from 1/128 to 1/2, the same pairing, the sparse-over-dense speed-up per cell.

Writes benchmarks/results/train_step.json and its BENCHMARKS.md section ("train-step").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common.helpers import RESULTS, ROOT, load_line, machine_info, machine_line, stamped_log, write_section
from trainer.config import DictionarySpec, TrainSpec
from trainer.sparse_decode import CPU_SPARSE_FRACTION
from trainer.train import new_member, train_step


def _member(arch: str, d: int, latents: int, k: int, sparse: bool, train: TrainSpec):
    spec = DictionarySpec(name=f"{arch}-{'sparse' if sparse else 'dense'}", architecture=arch,
                          n_latents=latents, k=k, seed=0)
    m = new_member(spec, train, 1, d, [1.0], "cpu")
    m.model.sparse_decode = sparse
    return m


def _batches(n: int, batch: int, d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[:, None] / d ** 0.5
    return [(torch.randn(batch, d, generator=g) @ mix + 0.1).view(batch, 1, d) for _ in range(n)]


def pair(arch: str, d: int, latents: int, k: int, batch: int, rounds: int, log) -> dict:
    """Dense and sparse steps of the same dictionary, alternating, after one warm-up step each."""
    train = TrainSpec(dictionaries=[], steps=10**9, lr=3e-4, lr_warmup_steps=0, lr_decay_fraction=0.0,
                      grad_clip=1.0, dead_after_tokens=10**12)
    sides = {"dense": _member(arch, d, latents, k, False, train),
             "sparse": _member(arch, d, latents, k, True, train)}
    data = _batches(2, batch, d)
    times = {s: {"wall": [], "cpu": []} for s in sides}
    for r in range(rounds + 1):
        order = ["dense", "sparse"] if r % 2 == 0 else ["sparse", "dense"]
        for s in order:
            w, c = time.perf_counter(), time.process_time()
            train_step(sides[s], data[r % 2], r, train)
            if r:  # round 0 warms up (Adam's state, allocator)
                times[s]["wall"].append(time.perf_counter() - w)
                times[s]["cpu"].append(time.process_time() - c)
    out = {s: {"median_wall_s": statistics.median(t["wall"]), "median_cpu_s": statistics.median(t["cpu"]),
               "tokens_per_s": batch / statistics.median(t["wall"]), **t} for s, t in times.items()}
    for kind in ("wall", "cpu"):
        out[f"speedup_{kind}"] = statistics.median(
            a / b for a, b in zip(times["dense"][kind], times["sparse"][kind], strict=True))
    log(f"  {arch} d {d} m {latents} k {k} batch {batch}: dense {out['dense']['median_wall_s']:.3f} s, "
        f"sparse {out['sparse']['median_wall_s']:.3f} s; x{out['speedup_wall']:.2f} wall, "
        f"x{out['speedup_cpu']:.2f} CPU")
    return out


def render(res: dict) -> str:
    s = res["setup"]
    lines = ["## Training step: sparse TopK / BatchTopK decode", "",
             f"`trainer.train.train_step` (Adam, grad clip 1), dense decode vs sparse (trainer/sparse_decode.py: "
             f"embedding_bag decode, CSR products for W_dec's and W_enc's gradients, only the encoder's forward "
             f"product dense); {s['rounds']} rounds after one warm-up step, dense and sparse alternating. "
             "Ratios are medians of per-round ratios (dense time / sparse time).", "",
             "| case | dense tokens/s | sparse tokens/s | speed-up (wall) | speed-up (CPU time) |",
             "|---|---:|---:|---:|---:|"]
    for name, c in res["target"].items():
        lines.append(f"| {name} | {c['dense']['tokens_per_s']:,.0f} | {c['sparse']['tokens_per_s']:,.0f} | "
                     f"{c['speedup_wall']:.2f}x | {c['speedup_cpu']:.2f}x |")
    if res["crossover"]:
        lines += ["", f"Crossover (TopK SAE, batch {s['crossover_batch']}, {s['crossover_rounds']} rounds): "
                  "sparse-over-dense speed-up in CPU time (wall in parentheses) by k / n_latents. The rule "
                  f"(`prefers_sparse`) takes sparse on a CPU up to k / n_latents = 1/{round(1 / CPU_SPARSE_FRACTION)}.",
                  "", "| d_model, latents | " + " | ".join(f"k/m = 1/{f}" for f in s["fractions"]) + " |",
                  "|---|" + "---:|" * len(s["fractions"])]
        for size, row in res["crossover"].items():
            lines.append(f"| {size} | " + " | ".join(
                f"{row[str(f)]['speedup_cpu']:.2f}x ({row[str(f)]['speedup_wall']:.2f}x)" for f in s["fractions"]) + " |")
    m = res["machine"]
    lines += ["", machine_line(m), load_line(*res["load_average"].values()),
              "Raw figures: `benchmarks/results/train_step.json`. Reproduce: "
              "`.venv/bin/python -m benchmarks.bench_train_step`.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--latents", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--crossover-sizes", default="512x4096,256x16384", help="d_model x latents, comma-separated")
    ap.add_argument("--fractions", default="128,32,8,4,2", help="n_latents / k for the crossover")
    ap.add_argument("--crossover-batch", type=int, default=1024)
    ap.add_argument("--crossover-rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes: d 512, 4,096 latents, batch 1,024")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--json", default=str(RESULTS / "train_step.json"))
    args = ap.parse_args()
    if args.quick:
        args.d_model, args.latents, args.batch, args.crossover_sizes = 512, 4096, 1024, "256x2048"
    torch.set_num_threads(args.threads)
    log = stamped_log()
    load_before = os.getloadavg()
    target = {}
    for arch in ("topk", "batchtopk"):
        name = f"{arch} SAE, d_model {args.d_model}, {args.latents:,} latents, k {args.k}, batch {args.batch:,}"
        target[name] = pair(arch, args.d_model, args.latents, args.k, args.batch, args.rounds, log)
    fractions = [int(f) for f in args.fractions.split(",") if f]
    crossover = {}
    for size in filter(None, args.crossover_sizes.split(",")):
        d, m = (int(v) for v in size.split("x"))
        crossover[f"{d}, {m:,}"] = {str(f): pair("topk", d, m, m // f, args.crossover_batch,
                                                 args.crossover_rounds, log) for f in fractions}
    result = {"machine": machine_info(),
              "setup": {"rounds": args.rounds, "crossover_batch": args.crossover_batch,
                        "crossover_rounds": args.crossover_rounds, "fractions": fractions,
                        "threads": args.threads},
              "target": target, "crossover": crossover,
              "load_average": {"before": load_before, "after": os.getloadavg()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    body = render(result)
    write_section(Path(args.out), "train-step", body)
    print(body)


if __name__ == "__main__":
    main()
