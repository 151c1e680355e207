"""`mdiff saebench`: SAEBench's core, absorption and sparse-probing evaluations for every SAE of an
experiment, a comparison table and three figures; resumable.

Per dictionary, in its evaluation folder `<eval dir>/<dictionary>/` (beside splice.json):

    splice.json                 the core metrics: read if `mdiff eval` wrote it, else computed here
    absorption.json             our absorption result (per-letter detail), with its settings hash
    sparse_probing.json         our probing result (per dataset and task), with its settings hash
    eval_results/<type>/<key>_eval_results.json   SAEBench's files (core, absorption, sparse_probing)

and for the study, in `[saebench] out_dir` (default `<eval dir>/saebench/`): comparison.csv,
comparison.md, metrics.png, absorption.png, probing.png, study.json (what ran, what was reused,
the seconds each part took) and cache/ (the words' activations per model, hook and settings).

A result file whose settings hash matches (the section's settings, the seed, the dictionary's
weights and the model's identity) is reused, so a killed run resumes with the next unfinished part
and a rerun only redraws the table and figures. Crosscoders get their core files (one per model);
absorption and probing need one model's activations, so they are skipped for them with a note.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from evals.config import EvalExperiment, EvalSpec
from evals.run import eval_dir
from evals.saebench import figures, table
from evals.saebench.config import SaeBenchSpec
from evals.saebench.core_schema import core_output, frac_alive, result_key
from evals.saebench.groups import Group, ModelSide
from evals.saebench.outputs import absorption_output, probing_output, write_result
from evals.saebench.view import SaeView
from evals.splice import SPLICE_FILE, evaluate_dictionary
from pipeline import models as M
from pipeline.records import atomic_write_json, canonical_hash, sha256_file
from pipeline.typed_config import ConfigError
from trainer.dictionaries import WEIGHTS_FILE
from trainer.trained import check_model_identity, open_trained, read_trained_meta

STUDY_FILE = "study.json"
RESULT_FORMAT = 1
# splice.json keys added after the first splice evaluations: their absence is worth a note
NEWER_SPLICE_KEYS = ("relative_reconstruction_bias", "explained_variance_legacy")


@dataclass
class StudyResult:
    out_dir: Path
    rows: list[dict]
    table: str
    figures: dict[str, Path]
    record: dict = field(default_factory=dict)


def study_dir(cfg: EvalExperiment, spec: SaeBenchSpec) -> Path:
    return Path(spec.out_dir) if spec.out_dir else eval_dir(cfg) / "saebench"


def dictionary_dirs(cfg: EvalExperiment, spec: SaeBenchSpec) -> dict[str, Path]:
    if cfg.train is None:
        raise ConfigError(cfg.source_file or "<config>", ["train: missing (the study evaluates the "
                                                          "[train] section's dictionaries; see README)"])
    names = spec.dictionaries or [d.name for d in cfg.train.dictionaries]
    dirs = {n: Path(cfg.train.out_dir) / n for n in names}
    missing = [str(d) for d in dirs.values() if not (d / "config.json").exists()]
    if missing:
        raise FileNotFoundError(f"no config.json in {', '.join(missing)}: not trained yet; "
                                f"run: mdiff train {cfg.source_file or '<config>'}")
    return dirs


def _core(name: str, dict_dir: Path, cfg: EvalExperiment, folder: Path, device, models_cache: dict,
          progress: bool, log) -> tuple[dict, bool]:
    """(splice.json's content, whether it was computed now); SAEBench's core files written."""
    path = folder / SPLICE_FILE
    computed = not path.is_file()
    if computed:
        ev = cfg.eval or EvalSpec()
        log(f"{name}: no {path}; splicing into {ev.n_sequences} validation sequences")
        splice = evaluate_dictionary(dict_dir, cfg, out_dir=folder, n_sequences=ev.n_sequences,
                                     batch_size=ev.batch_size, device=device, progress=progress,
                                     models_cache=models_cache)
    else:
        splice = json.loads(path.read_text(encoding="utf-8"))
        per_model = next(iter((splice.get("metrics") or {}).get("per_model", {}).values()), {})
        lacking = [k for k in NEWER_SPLICE_KEYS if k not in per_model]
        if lacking:
            log(f"{name}: {path} predates {', '.join(lacking)} (null in the results); delete it and "
                "rerun to compute them")
    meta = read_trained_meta(dict_dir)
    for model in splice.get("models") or []:
        write_result(folder / "eval_results", result_key(splice, model), core_output(splice, meta, model))
    return splice, computed


def core_metrics(splice: dict, model: str) -> dict:
    """The model's splice metrics with the dictionary's l0, l1 and frac_alive beside them."""
    metrics = splice.get("metrics") or {}
    out = dict((metrics.get("per_model") or {}).get(model) or {})
    for key in ("l0", "l1"):
        out.setdefault(key, metrics.get(key))
    out["frac_alive"] = frac_alive(metrics)
    return out


def _cached(path: Path, settings: str) -> dict | None:
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("settings") == settings:
            return data
    return None


def _store(path: Path, settings: str, result: dict, seconds: float) -> dict:
    data = {"format": RESULT_FORMAT, "settings": settings, "seconds": round(seconds, 2), "result": result}
    atomic_write_json(path, data)
    return data


def _open_groups(dirs: dict[str, Path], cfg: EvalExperiment, spec: SaeBenchSpec, device, models_cache: dict,
                 out: Path, progress: bool, log) -> tuple[dict[str, ModelSide], dict[str, str], dict[str, str]]:
    """(model side per group, group of each SAE, why each other dictionary is skipped)."""
    sides: dict[tuple, ModelSide] = {}
    member: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, d in dirs.items():
        trained = open_trained(d, cfg, device=device)
        if trained.dictionary.n_models != 1:
            skipped[name] = f"a {trained.dictionary.n_models}-model crosscoder: absorption and sparse probing need an SAE"
            continue
        model = trained.models[0]
        key = (model, trained.hook.label, trained.scales[0])
        if key not in sides:
            def load(model=model, arr=trained.arrays[0]) -> tuple:
                lm = models_cache.get(model)
                if lm is None:
                    lm = models_cache[model] = M.load_model(cfg.model(model), device=device)
                check_model_identity(model, lm.identity, arr)
                return lm, M.load_tokenizer(cfg.model(model))
            group = Group(model, trained.hook, trained.scales[0], trained.arrays[0].attrs.get("model_key", model))
            sides[key] = ModelSide(group, load, spec, out / "cache", progress=progress, log=log)
        sides[key].group.saes[name] = SaeView.of(trained.dictionary)
        member[name] = "|".join(map(str, key))
    return {"|".join(map(str, k)): v for k, v in sides.items()}, member, skipped


def run_study(cfg: EvalExperiment, spec: SaeBenchSpec, *, progress: bool = True,
              log: Callable[[str], None] = print) -> StudyResult:
    started = time.perf_counter()
    dirs = dictionary_dirs(cfg, spec)
    evals, out = eval_dir(cfg), study_dir(cfg, spec)
    out.mkdir(parents=True, exist_ok=True)
    device = M.resolve_device(spec.device)
    models_cache: dict = {}
    record: dict = {"experiment": cfg.name, "dictionaries": {}, "groups": {}}

    splices = {}
    for name, d in tqdm(dirs.items(), desc="core", unit="dictionary", disable=not progress, dynamic_ncols=True):
        t0 = time.perf_counter()
        splices[name], computed = _core(name, d, cfg, evals / name, device, models_cache, progress, log)
        record["dictionaries"][name] = {"core": {"computed": computed, "seconds": round(time.perf_counter() - t0, 2)}}

    sides, member, skipped = _open_groups(dirs, cfg, spec, device, models_cache, out, progress, log)
    for name, why in skipped.items():
        log(f"{name}: {why}: core metrics only")
        record["dictionaries"][name]["skipped"] = why
    weights = {n: sha256_file(dirs[n] / WEIGHTS_FILE) for n in member}

    def settings(name: str, part: str) -> str:
        g = sides[member[name]].group
        return canonical_hash({"format": RESULT_FORMAT, "part": part, "seed": spec.seed,
                               "spec": dataclasses.asdict(getattr(spec, part)), "weights": weights[name],
                               "model": g.model_key, "hook": g.hook.label, "scale": g.scale})

    parts: dict[str, dict] = {n: {} for n in dirs}
    if spec.absorption.enabled:
        for name in tqdm(list(member), desc="absorption", unit="dictionary", disable=not progress, dynamic_ncols=True):
            path, s = evals / name / "absorption.json", settings(name, "absorption")
            data = _cached(path, s)
            computed = data is None
            if computed:
                t0 = time.perf_counter()
                data = _store(path, s, sides[member[name]].absorption(name), time.perf_counter() - t0)
            if data["result"].get("note"):
                log(f"{name}: {data['result']['note']}")
            record["dictionaries"][name]["absorption"] = {"computed": computed, "seconds": data["seconds"]}
            parts[name]["absorption"] = data["result"]
    if spec.probing.enabled:
        for key, side in sides.items():
            todo = [n for n in side.group.saes if _cached(evals / n / "sparse_probing.json",
                                                           settings(n, "probing")) is None]
            if todo:
                for name, result in side.probing(todo).items():
                    _store(evals / name / "sparse_probing.json", settings(name, "probing"), result,
                           side.seconds.get("probing", 0.0) / len(todo))
            for name in side.group.saes:
                data = _cached(evals / name / "sparse_probing.json", settings(name, "probing"))
                parts[name]["probing"] = data["result"]
                record["dictionaries"][name]["probing"] = {"computed": name in todo, "seconds": data["seconds"]}
    for key, side in sides.items():
        record["groups"][key] = {"model": side.group.model, "hook": side.group.hook.label,
                                 "saes": list(side.group.saes), "seconds": {k: round(v, 2) for k, v in side.seconds.items()}}

    rows = []
    for name, d in dirs.items():
        meta, splice = read_trained_meta(d), splices[name]
        absorption, probing = parts[name].get("absorption"), parts[name].get("probing")
        if absorption is not None:
            write_result(evals / name / "eval_results", name, absorption_output(
                absorption, {**dataclasses.asdict(spec.absorption), "random_seed": spec.seed}, meta, name))
        if probing is not None:
            write_result(evals / name / "eval_results", name, probing_output(
                probing, {**dataclasses.asdict(spec.probing), "random_seed": spec.seed}, meta, name))
        for model in splice.get("models") or []:
            rows.append(table.row(name, model, meta, core_metrics(splice, model), absorption, probing))
    table.write_csv(rows, spec.probing.ks, out / "comparison.csv")
    text = table.write_markdown(rows, spec.probing.ks, out / "comparison.md")
    drawn = figures.draw(rows, spec.probing.ks, out)
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["settings"] = dataclasses.asdict(spec)
    atomic_write_json(out / STUDY_FILE, record)
    log(f"SAEBench study in {out} ({record['seconds']:.0f} s)")
    return StudyResult(out, rows, text, drawn, record)
