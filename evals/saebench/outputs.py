"""SAEBench's result files (its `eval_output` JSON), so that its plotting scripts read our results.

Every file is SAEBench's envelope: eval_type_id, eval_config, eval_id, datetime_epoch_millis,
eval_result_metrics (categories of flat metrics), eval_result_details, eval_result_unstructured,
sae_bench_commit_hash, sae_lens_id, sae_lens_release_id, sae_lens_version, sae_cfg_dict. Files are
named `<result key>_eval_results.json` in a folder per eval type (`core/`, `absorption/`,
`sparse_probing/`), as SAEBench writes them: its scripts key results by that file name and pick
the eval type from the path. Values we do not have are null; our own extras go to
eval_result_unstructured, never into SAEBench's metric categories.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

from pipeline.records import atomic_write_text, strict_json

EVAL_TYPE_ABSORPTION = "absorption_first_letter"
EVAL_TYPE_SPARSE_PROBING = "sparse_probing"
EVAL_TYPE_CORE = "core"
SOURCE = "mdiff (offline SAEBench-class evaluation; not SAEBench's code)"
# our architecture names -> SAEBench's trainer names (their plots' markers and labels)
ARCHITECTURE_NAMES = {"relu": "standard", "topk": "topk", "batchtopk": "batch_topk", "jumprelu": "jumprelu"}
_HOOK = re.compile(r"layer(\d+)\.(resid_pre|resid_post)")


def sae_cfg(meta: dict, model: str | None = None) -> dict:
    """SAEBench's sae_cfg_dict from a dictionary folder's config.json (what its plots read:
    architecture, d_sae, training_tokens; the rest for the reader)."""
    spec = meta.get("spec") or {}
    train = meta.get("train") or {}
    m = _HOOK.fullmatch(str(meta.get("hook", "")))
    steps, batch = meta.get("steps"), train.get("batch_size")
    models = list(meta.get("models") or [])
    scales = list(meta.get("scales") or [])
    model = model or (models[0] if models else None)
    return {
        "architecture": ARCHITECTURE_NAMES.get(meta.get("architecture"), meta.get("architecture")),
        "d_in": meta.get("d_model"), "d_sae": meta.get("n_latents"), "k": spec.get("k"),
        "hook_name": f"blocks.{m.group(1)}.hook_{m.group(2)}" if m else None,
        "hook_layer": int(m.group(1)) if m else None,
        "model_name": model,
        "training_tokens": steps * batch if isinstance(steps, int) and isinstance(batch, int) else None,
        "dtype": "float32",
        "activation_scale": scales[models.index(model)] if model in models and len(scales) == len(models) else None,
        "mdiff_dictionary": meta.get("name"), "mdiff_experiment": meta.get("experiment"),
    }


def envelope(eval_type: str, eval_config: dict, metrics: dict, details: list, unstructured: dict,
             meta: dict, key: str, model: str | None = None) -> dict:
    """One result file's content (SAEBench's BaseEvalOutput fields, in its order)."""
    return strict_json({
        "eval_type_id": eval_type,
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": None,
        "sae_lens_id": key,
        "sae_lens_release_id": meta.get("experiment"),
        "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg(meta, model),
        "eval_result_unstructured": {"source": SOURCE, **unstructured},
    })


def write_result(folder: str | Path, key: str, output: dict) -> Path:
    """`<folder>/<eval type>/<key>_eval_results.json`."""
    path = Path(folder) / output["eval_type_id"].replace(EVAL_TYPE_ABSORPTION, "absorption") / f"{key}_eval_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(output, indent=2))
    return path


def absorption_output(result: dict, config: dict, meta: dict, key: str) -> dict:
    """SAEBench's absorption file from `evals.saebench.absorption.evaluate_absorption`'s result."""
    names = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
             "std_dev_absorption_fraction_score", "std_dev_full_absorption_score", "std_dev_num_split_features")
    detail_keys = ("first_letter", "mean_absorption_fraction", "full_absorption_rate", "num_full_absorption",
                   "num_probe_true_positives", "num_split_features")
    details = [{k: r[k] for k in detail_keys} for r in result["letters"] if r["scored"]]
    extra = {k: v for k, v in result.items() if k not in names and k != "letters"}
    extra["letters"] = [{k: r[k] for k in ("first_letter", "probe_f1", "scored", "split_latents", "ksparse_f1")}
                        for r in result["letters"]]
    return envelope(EVAL_TYPE_ABSORPTION, config, {"mean": {k: result.get(k) for k in names}}, details, extra,
                    meta, key)


def probing_output(result: dict, config: dict, meta: dict, key: str) -> dict:
    """SAEBench's sparse-probing file from the study's probing result ({"mean": ..., "datasets": ...})."""
    mean = result["mean"]
    metrics = {"llm": {k: v for k, v in mean.items() if k.startswith("llm_")},
               "sae": {k: v for k, v in mean.items() if k.startswith("sae_")}}
    details = [{"dataset_name": name, **{k: v for k, v in r.items() if k.startswith(("llm_", "sae_"))}}
               for name, r in result["datasets"].items()]
    datasets = {name: {k: v for k, v in r.items() if not k.startswith(("llm_", "sae_"))}
                for name, r in result["datasets"].items()}
    return envelope(EVAL_TYPE_SPARSE_PROBING, config, metrics, details,
                    {"datasets": datasets, "skipped": result.get("skipped", {})}, meta, key)
