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

from .browser import build_browser
from .diff import analyse_dictionary
from .diff_lens import run_difference_lens
from .latent_scaling import run_latent_scaling
from .splice import evaluate_dictionary


def eval_dir(cfg: ExperimentConfig) -> Path:
    ev = cfg.eval or EvalSpec()
    return Path(ev.out_dir) if ev.out_dir else Path(cfg.train.out_dir) / "eval"


def _num(value, spec: str) -> str:
    """A metric for the log; None where splice.json holds null (a NaN: e.g. a standard error of
    one sequence)."""
    return "n/a" if value is None else format(value, spec)


def summary_lines(name: str, metrics: dict, diff: dict) -> list[str]:
    """What the log says of one evaluated dictionary: the splice (ΔCE with its standard error over
    the spliced sequences, and the EV of those tokens) and the EV of the typical stored rows."""
    dead = "unknown" if metrics["dead_latents"] is None else metrics["dead_latents"]
    per_model = ", ".join(
        f"{m}: ΔCE {_num(v['ce_diff'], '.4f')} ± {_num(v['ce_diff_stderr'], '.4f')} "
        f"CE recovered {_num(v['ce_loss_score'], '.3f')} EV {_num(v['explained_variance'], '.3f')}"
        for m, v in metrics["per_model"].items())
    lines = [f"  {name}: L0 {_num(metrics['l0'], '.1f')}, dead in training {dead}, silent on eval "
             f"{metrics['silent_on_eval']} (on {metrics['silent_on_eval_tokens']} tokens), {per_model} "
             "(EV of the spliced tokens, high-norm ones included)"]
    stored = {m: g.get("typical") for m, g in (diff.get("reconstruction_by_source") or {}).items()}
    if stored and all(stored.values()):
        lines.append(f"  {name}: EV on the stored validation rows, typical tokens (high-norm ones apart in "
                     "diff.json): " + ", ".join(f"{m} {_num(g['explained_variance'], '.3f')} ({g['tokens']:,} tokens)"
                                                for m, g in stored.items()))
    return lines


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
                                  device=device, progress=progress, log=log)  # scans ev.scan_rows
        results[name] = {"splice": splice, "diff": diff}
        if ev.latent_scaling is not None and len(diff["models"]) > 1:
            results[name]["latent_scaling"] = run_latent_scaling(dict_dir, cfg, ev.latent_scaling, out / name,
                                                                 progress=progress, log=log)
        results[name]["browser"] = build_browser(dict_dir, cfg, ev, out / name, spec=ev.browser, tokenizer=tokenizer,
                                                 device=device, progress=progress, models_cache=models_cache,
                                                 log=log)
        for line in summary_lines(name, splice["metrics"], diff):
            log(line)
    lens = None
    if ev.diff_lens is not None:
        lens = run_difference_lens(cfg, ev.diff_lens, out / "diff_lens", progress=progress, log=log)
    atomic_write_text(out / "index.json", json.dumps({
        "experiment": cfg.name, "dictionaries": names,
        "diff_lens": "diff_lens/diff_lens.json" if lens is not None else None}, indent=1))
    log(f"evaluations in {out}")
    return results
