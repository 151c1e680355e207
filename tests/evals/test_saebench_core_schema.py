"""SAEBench's core result file from a splice.json built here: every name mapped, nothing invented."""

from __future__ import annotations

import json

from evals.saebench.core_schema import CATEGORIES, core_output, result_key
from evals.saebench.outputs import write_result

PER_MODEL = {"ce_loss_without_sae": 2.0, "ce_loss_with_sae": 2.2, "ce_loss_with_ablation": 9.0,
             "ce_loss_with_mean_ablation": 5.0, "ce_diff": 0.2, "ce_loss_score": 0.97, "kl_div_with_sae": 0.3,
             "kl_div_with_ablation": 7.0, "kl_div_with_mean_ablation": 3.0, "kl_div_score": 0.957,
             "explained_variance": 0.81, "mse": 12.5, "cossim": 0.93, "l2_norm_in": 24.0, "l2_norm_out": 22.8,
             "l2_ratio": 0.95, "relative_reconstruction_bias": 0.97, "explained_variance_legacy": 0.74,
             "store_rel_error": 0.002}
META = {"name": "topk-k20", "experiment": "sweep", "architecture": "topk", "d_model": 2304, "n_latents": 16384,
        "spec": {"k": 20}, "steps": 1000, "train": {"batch_size": 2048}, "hook": "layer19.resid_post",
        "models": ["base"], "scales": [0.5]}


def splice(models=("base",), **top):
    return {"dictionary": "topk-k20", "experiment": "sweep", "models": list(models), "tokenset_id": "ts-1",
            "splice": "error", "n_sequences": 10, "n_tokens": 10 * 127,
            "metrics": {"per_model": {m: dict(PER_MODEL) for m in models}, "l0": 20.5, "n_latents": 16384,
                        "n_tokens": 1270, **top}}


def test_every_saebench_core_metric_comes_from_splice_json_by_name():
    out = core_output(splice(l1=33.0, frac_alive=0.9, dead_latents=7), META, "base")
    m = out["eval_result_metrics"]
    assert out["eval_type_id"] == "core" and out["sae_lens_id"] == "topk-k20"
    for category, names in CATEGORIES.items():
        for name in names:
            want = {"l0": 20.5, "l1": 33.0}.get(name, PER_MODEL.get(name))
            assert m[category][name] == want, (category, name)
    assert m["token_stats"] == {"total_tokens_eval_reconstruction": 1270, "total_tokens_eval_sparsity_variance": 1270}
    assert m["misc_metrics"]["frac_alive"] == 0.9 and m["misc_metrics"]["freq_over_1_percent"] is None
    assert out["eval_result_unstructured"]["explained_variance_legacy"] == 0.74
    assert out["eval_config"]["context_size"] == 128 and out["eval_config"]["dataset"] == "ts-1"
    cfg = out["sae_cfg_dict"]
    assert (cfg["architecture"], cfg["d_sae"], cfg["d_in"], cfg["k"]) == ("topk", 16384, 2304, 20)
    assert cfg["hook_name"] == "blocks.19.hook_resid_post" and cfg["training_tokens"] == 2048 * 1000
    assert isinstance(out["datetime_epoch_millis"], int) and len(out["eval_id"]) == 36


def test_missing_values_are_null_and_frac_alive_falls_back_to_the_silent_latents():
    old = splice(dead_latents=4096)  # a splice.json written before l1 and frac_alive
    for key in ("relative_reconstruction_bias", "explained_variance_legacy"):
        del old["metrics"]["per_model"]["base"][key]
    m = core_output(old, META, "base")["eval_result_metrics"]
    assert m["sparsity"]["l1"] is None and m["shrinkage"]["relative_reconstruction_bias"] is None
    assert m["misc_metrics"]["frac_alive"] == 1 - 4096 / 16384
    new = splice(l1=1.0, silent_on_eval=1024, dead_latents=5)  # dead_latents now the training count
    assert core_output(new, META, "base")["eval_result_metrics"]["misc_metrics"]["frac_alive"] == 1 - 1024 / 16384


def test_a_crosscoder_gives_one_file_per_model_that_saebench_scripts_read(tmp_path):
    cc = splice(models=("base", "chat"), l1=2.0)
    keys = [result_key(cc, m) for m in cc["models"]]
    assert keys == ["topk-k20_base", "topk-k20_chat"]
    for model, key in zip(cc["models"], keys):
        path = write_result(tmp_path, key, core_output(cc, {**META, "models": ["base", "chat"]}, model))
        assert path == tmp_path / "core" / f"{key}_eval_results.json"
    # what SAEBench's graphing_utils.get_core_results reads: the key from the file name, l0 and
    # ce_loss_score from the categories, architecture and d_sae from sae_cfg_dict
    data = json.loads((tmp_path / "core" / "topk-k20_chat_eval_results.json").read_text())
    assert data["eval_result_metrics"]["sparsity"]["l0"] == 20.5
    assert data["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] == 0.97
    assert data["sae_cfg_dict"]["model_name"] == "chat" and data["sae_cfg_dict"]["activation_scale"] is None
    flat = {k: v for cat in data["eval_result_metrics"].values() for k, v in cat.items()}  # their flattening
    assert len(flat) == sum(map(len, data["eval_result_metrics"].values()))  # no name in two categories
