"""Foreign dictionaries into an experiment, and our SAEs out to SAELens.

Importing re-expresses a foreign dictionary for the store's normalized rows (see common.py,
"Units") and saves it the way `mdiff train` saves one: dictionary.safetensors + config.json naming
the store, token set, hook, models and arrays, which is everything stage three reads, plus
`imported_from`, where it came from. `mdiff eval CONFIG --dictionary DIR` then evaluates it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from pipeline import experiment as E
from pipeline import store as S
from pipeline.records import sha256_file
from trainer.config import TrainExperiment as ExperimentConfig
from trainer.dictionaries import CONFIG_FILE, WEIGHTS_FILE, load_dictionary

from . import read_foreign, saelens
from .common import FormatError


def default_out_dir(cfg: ExperimentConfig, name: str) -> Path:
    """Beside the experiment's trained dictionaries (<train.out_dir>/<name>), or runs/<experiment>/<name>."""
    if cfg.train is not None and cfg.train.out_dir:
        return Path(cfg.train.out_dir) / name
    return Path(cfg.source_file or "experiment.toml").resolve().parent / "runs" / cfg.name / name


def _choose_models(cfg: ExperimentConfig, models: list[str] | None, n: int) -> list[str]:
    names = [m.name for m in cfg.models]
    if not models:
        if len(names) != n:
            raise FormatError(f"the dictionary is over {n} model(s) and the config defines {len(names)} "
                              f"({', '.join(names)}): name the model(s) it was trained on, in its "
                              "order, with --models")
        return names
    unknown = [m for m in models if m not in names]
    if unknown or len(models) != n:
        raise FormatError(f"--models {','.join(models)}: need {n} name(s) from the config's models "
                          f"({', '.join(names)})" + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    return list(models)


def import_dictionary(source: str | Path, cfg: ExperimentConfig, *, models: list[str] | None = None,
                      hook: str | None = None, name: str | None = None,
                      out_dir: str | Path | None = None, format: str = "auto",
                      input_scales: list[float] | None = None, log=print) -> Path:
    """Read the dictionary at `source`, re-express it for the experiment's stored arrays of
    `models` at `hook` (default: the hook its own config names) and save it; returns the folder."""
    foreign = read_foreign(source, format, input_scales)
    dictionary = foreign.dictionary
    models = _choose_models(cfg, models, dictionary.n_models)
    label = hook or foreign.hook
    if label is None:
        raise FormatError(f"{source}: its hook {foreign.hook_name!r} is not a residual-stream hook "
                          "known here; name the config hook it was trained on with --hook "
                          "(e.g. layer8.resid_post)")
    if hook and foreign.hook and hook != foreign.hook:
        log(f"note: {source} names {foreign.hook_name!r} ({foreign.hook}); using {hook} as asked")
    try:
        hook_spec = E.hook_by_label(cfg, label)
    except KeyError:
        raise FormatError(f"hook {label!r} is not one of the config's [[hooks]] "
                          f"({', '.join(h.label for h in cfg.hooks)}); add it and run mdiff cache, "
                          "or pass --hook") from None
    root = S.StoreRoot(cfg.store, cfg.storage_options)
    root.ensure_format(create=False)
    ts_id = E.resolve_token_set(cfg).id
    arrays = [E.find_array(root, ts_id, cfg.model(m), hook_spec, cfg.source_file) for m in models]
    widths = sorted({int(a.array.shape[1]) for a in arrays})
    if widths != [dictionary.d_model]:
        raise FormatError(f"{source}: d_model {dictionary.d_model}, but the arrays of "
                          f"{', '.join(models)} at {label} have width {widths}: another model or hook")
    src = Path(source).resolve()
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "-", (src.parent if src.is_file() else src).name).strip("-.")
    name = name or "imported"
    ours = foreign.on_store([a.scale for a in arrays])
    ours.spec = dataclasses.replace(ours.spec, name=name)
    out = Path(out_dir) if out_dir else default_out_dir(cfg, name)
    ours.save(out, {"name": name, "experiment": cfg.name, "store": cfg.store, "tokenset_id": ts_id,
                    "hook": label, "models": models, "model_keys": [a.attrs["model_key"] for a in arrays],
                    "arrays": [a.path for a in arrays], "imported_from": foreign.provenance()})
    log(f"{foreign.format} {foreign.kind} -> {ours.architecture} ({ours.n_latents} latents) over "
        f"{', '.join(models)} at {label}: {out}")
    return out


def export_saelens(dict_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the SAE saved in `dict_dir` (by mdiff train or import) as a SAELens SAE folder."""
    dict_dir = Path(dict_dir)
    if not (dict_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{dict_dir} holds no {CONFIG_FILE}: point at a dictionary folder "
                                "(<train.out_dir>/<dictionary name>/)")
    meta = json.loads((dict_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    dictionary = load_dictionary(dict_dir)
    if "hook" not in meta:
        raise FormatError(f"{dict_dir / CONFIG_FILE} names no hook; SAELens needs the hook point")
    models = meta.get("models") or []
    provenance = {"exported_from": str(dict_dir.resolve()),
                  "files": {f: sha256_file(dict_dir / f) for f in (WEIGHTS_FILE, CONFIG_FILE)},
                  "scales_folded": dictionary.scales, "normalized_inputs": not dictionary.folded,
                  **{k: meta[k] for k in ("experiment", "store", "tokenset_id", "hook", "models",
                                          "model_keys", "arrays") if k in meta}}
    return saelens.export(dictionary, out_dir, hook=meta["hook"],
                          model_name=models[0] if models else None, provenance=provenance)
