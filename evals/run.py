"""`mdiff eval`: every trained dictionary of an experiment, spliced back into its models and
analysed for what differs between them. Models are loaded once and shared by all dictionaries."""

from __future__ import annotations

import json
from pathlib import Path

from evals.config import EvalExperiment as ExperimentConfig
from evals.config import EvalSpec
from pipeline import experiment as E
from pipeline import models as M
from pipeline.records import atomic_write_text
from pipeline.typed_config import ConfigError

from .diff import analyse_dictionary
from .splice import evaluate_dictionary


def eval_dir(cfg: ExperimentConfig) -> Path:
    ev = cfg.eval or EvalSpec()
    return Path(ev.out_dir) if ev.out_dir else Path(cfg.train.out_dir) / "eval"


def run_eval(cfg: ExperimentConfig, progress: bool = True, log=print,
             dict_dirs: list[str | Path] | None = None) -> dict[str, dict]:
    """Evaluate the [train] section's dictionaries, or the dictionary folders `dict_dirs` (e.g.
    imported ones; written to <eval dir>/<folder name>, the eval dir defaulting to beside them)."""
    ev = cfg.eval or EvalSpec()
    if dict_dirs:
        dirs = {Path(d).name: Path(d) for d in dict_dirs}
        out = eval_dir(cfg) if ev.out_dir or cfg.train else Path(dict_dirs[0]).parent / "eval"
    elif cfg.train is None:
        raise ConfigError(cfg.source_file or "<config>",
                          ["train: missing (evaluations need the [train] section that names the "
                           "dictionaries; see README)"])
    else:
        out = eval_dir(cfg)
        names = ev.dictionaries or [d.name for d in cfg.train.dictionaries]
        dirs = {n: Path(cfg.train.out_dir) / n for n in names}
    missing = [str(d) for d in dirs.values() if not (d / "config.json").exists()]
    if missing:
        raise FileNotFoundError(
            f"no config.json in {', '.join(missing)}: not trained (or imported) yet; "
            f"run: mdiff train {cfg.source_file or '<config>'}")
    names = list(dirs)
    device = M.resolve_device(ev.device)
    tokenizer, _ = E.experiment_tokenizer(cfg)  # None without weights: splicing refuses first
    models_cache: dict = {}
    results = {}
    for name, dict_dir in dirs.items():
        log(f"{name}: splicing into {ev.n_sequences} validation sequences per model")
        splice = evaluate_dictionary(dict_dir, cfg, n_sequences=ev.n_sequences,
                                     batch_size=ev.batch_size, device=device, out_dir=out / name,
                                     progress=progress, models_cache=models_cache)
        diff = analyse_dictionary(dict_dir, cfg, ev, out / name, tokenizer,
                                  n_sequences=ev.n_sequences, device=device, progress=progress)
        results[name] = {"splice": splice, "diff": diff}
        per_model = splice["metrics"]["per_model"]
        log(f"  {name}: L0 {splice['metrics']['l0']:.1f}, dead {splice['metrics']['dead_latents']}, "
            + ", ".join(f"{m}: ΔCE {v['ce_diff']:.4f} CE recovered {v['ce_loss_score']:.3f} "
                        f"EV {v['explained_variance']:.3f}" for m, v in per_model.items()))
    atomic_write_text(out / "index.json", json.dumps({"experiment": cfg.name, "dictionaries": names}, indent=1))
    log(f"evaluations in {out}")
    return results
