"""SAEBench-class study benchmark: how long `mdiff saebench` takes for a sweep on this machine, part
by part (core, the words' forwards, the letter probe, absorption per SAE, sparse probing).

With the demo's outputs present (`make demo`), it times the study of the demo's SmolLM2 SAE
(benchmarks/saebench-smollm2-demo.toml); otherwise a small setup: a tiny random llama and a sweep of
three SAEs trained here. The study's outputs are written to a temporary folder (the demo's own
results are not touched), so every part is computed, nothing reused; a second run of the same
study is timed too, to show what resuming costs. Wall and process CPU seconds are both reported:
on a shared machine the CPU time says more about the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common.helpers import ROOT, machine_info, machine_line, stamped_log, write_section

DEMO_CONFIG = ROOT / "benchmarks" / "saebench-smollm2-demo.toml"


def small_setup(work: Path, log) -> Path:
    """A tiny llama, its cache and a sweep of three SAEs: what runs without the demo."""
    from mdiff.saebench import load_study
    from mdiff.tiny import build_fixture, train_section, write_config
    from pipeline.cache import run_cache
    from trainer.train import run_train

    fx = build_fixture(work, n_docs=300, d_model=64, n_layers=4)
    sweep = [f'name = "topk-k{k}"\narchitecture = "topk"\nn_latents = 256\nk = {k}' for k in (4, 8, 16)]
    sections = train_section(["llama-s0"], sweep, steps=200, eval_every=200, checkpoint_every=200)
    sections["eval"] = {"n_sequences": 8, "batch_size": 8}
    sections["saebench"] = {"absorption": {"min_letters": 1}, "probing": {"train_per_class": 200,
                                                                         "test_per_class": 50}}
    path = write_config(work / "small.toml", fx, n_tokens=16384, context_length=64, hooks=((1, "resid_post"),),
                        store=str(work / "store"), chunk_tokens=1024, shard_tokens=4096, train=sections)
    cfg, _ = load_study(path)
    run_cache(cfg, log=lambda *a: None, progress=False)
    run_train(cfg, log=lambda *a: None, progress=False)
    log("small setup trained")
    return path


def timed_study(cfg, spec, log) -> dict:
    from evals.saebench.study import run_study

    t0, c0 = time.perf_counter(), time.process_time()
    result = run_study(cfg, spec, progress=False, log=log)
    return {"wall": round(time.perf_counter() - t0, 1), "cpu": round(time.process_time() - c0, 1),
            "record": result.record, "table": result.table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(DEMO_CONFIG), help="a study config (default: the demo's)")
    ap.add_argument("--out", default=None, help="BENCHMARKS.md to update (default: none)")
    ap.add_argument("--json", default="benchmarks/results/saebench.json")
    args = ap.parse_args()

    from mdiff.saebench import load_study

    log = stamped_log()
    work = Path(tempfile.mkdtemp(prefix="mdiff-bench-saebench-"))
    path = Path(args.config)
    cfg, spec = load_study(path)
    setup = "demo"
    if not all((Path(cfg.train.out_dir) / d.name / "config.json").is_file() for d in cfg.train.dictionaries):
        log(f"{path}: dictionaries not trained (run `make demo`); timing a small setup instead")
        path, setup = small_setup(work / "small", log), "small"
        cfg, spec = load_study(path)
    ev = dataclasses.replace(cfg.eval, out_dir=str(work / "eval")) if cfg.eval else None
    cfg = dataclasses.replace(cfg, eval=ev)
    spec = dataclasses.replace(spec, out_dir=str(work / "study"))
    before = os.getloadavg()
    first = timed_study(cfg, spec, log)
    second = timed_study(cfg, spec, log)
    after = os.getloadavg()
    machine = machine_info()
    out = {"machine": machine, "setup": setup, "config": str(path), "load_average": [before, after],
           "first_run": first, "second_run": {k: v for k, v in second.items() if k != "table"}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    body = (f"`mdiff saebench` on the {setup} setup ({path.name}): first run {first['wall']:.0f} s wall "
            f"({first['cpu']:.0f} s CPU), a rerun reusing every part {second['wall']:.0f} s.\n\n"
            f"Model side per group: {json.dumps(first['record']['groups'])}\n\n"
            f"Per dictionary: {json.dumps(first['record']['dictionaries'])}\n\n{first['table']}\n"
            f"{machine_line(machine)}\nLoad average (1 min) {before[0]:.1f} before, {after[0]:.1f} after: "
            "other jobs shared the cores, so these seconds are upper bounds for an idle machine.\n")
    print(body)
    if args.out:
        write_section(Path(args.out), "saebench", body)


if __name__ == "__main__":
    main()
