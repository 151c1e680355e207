"""SAEBench's `core` result file from our splice.json, so SAEBench's plotting scripts read our
splice metrics: a mapping of names, computing nothing new.

splice.json (evals/splice.py) holds, per model, the CE and KL metrics of the spliced, zero- and
mean-ablated runs and the reconstruction statistics (evals/reconstruction.py), and, for the
dictionary, l0 and the dead latents. SAEBench's categories take them by the same names:

    model_behavior_preservation     kl_div_score, kl_div_with_ablation, kl_div_with_sae
    model_performance_preservation  ce_loss_score, ce_loss_with_ablation, ce_loss_with_sae,
                                    ce_loss_without_sae
    reconstruction_quality          explained_variance, mse, cossim
    shrinkage                       l2_norm_in, l2_norm_out, l2_ratio, relative_reconstruction_bias
    sparsity                        l0, l1
    token_stats                     total_tokens_eval_reconstruction, ..._sparsity_variance
    misc_metrics                    frac_alive (older files: 1 - silent latents / n_latents), the rest null

`explained_variance` and `mse` are ours (evals/reconstruction.py says how SAEBench 0.6.0's
differ); the per-token `explained_variance_legacy` of SAEBench's paper tables goes to
eval_result_unstructured under that name. A metric splice.json lacks (an older file, or l1 before
the evaluator records it) is null. A crosscoder gives one file per model, keyed
`<dictionary>_<model>`; an SAE one keyed by the dictionary's name.
"""

from __future__ import annotations

from evals.saebench.outputs import EVAL_TYPE_CORE, envelope

CATEGORIES = {
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                       "ce_loss_without_sae"),
    "reconstruction_quality": ("explained_variance", "mse", "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": ("l0", "l1"),
}
MISC = ("freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
        "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
        "frac_alive")
UNSTRUCTURED = ("explained_variance_legacy", "ce_loss_with_mean_ablation", "kl_div_with_mean_ablation",
                "ce_diff", "store_rel_error")


def _lookup(name: str, per_model: dict, metrics: dict):
    """The model's value, else the dictionary's (l0, l1, frac_alive live at the top), else None."""
    if per_model.get(name) is not None:
        return per_model[name]
    return metrics.get(name)


def frac_alive(metrics: dict) -> float | None:
    """splice.json's frac_alive; for files written before it, 1 - silent / n_latents, with the
    latents silent on the evaluated tokens (`silent_on_eval`, or `dead_latents` in those files,
    which counted the same thing then)."""
    if metrics.get("frac_alive") is not None:
        return metrics["frac_alive"]
    silent, n = metrics.get("silent_on_eval", metrics.get("dead_latents")), metrics.get("n_latents")
    return 1.0 - silent / n if isinstance(silent, int) and isinstance(n, int) and n > 0 else None


def result_key(splice: dict, model: str) -> str:
    name = splice.get("dictionary") or "dictionary"
    return name if len(splice.get("models") or []) <= 1 else f"{name}_{model}"


def core_output(splice: dict, meta: dict, model: str) -> dict:
    """SAEBench's core eval_output for `model`'s metrics in splice.json (`meta`: the dictionary's
    config.json, for sae_cfg_dict)."""
    metrics = splice.get("metrics") or {}
    per_model = (metrics.get("per_model") or {}).get(model)
    if per_model is None:
        raise KeyError(f"splice.json of {splice.get('dictionary')!r} has no metrics for model {model!r} "
                       f"(it has {sorted(metrics.get('per_model') or {})})")
    categories = {cat: {name: _lookup(name, per_model, metrics) for name in names}
                  for cat, names in CATEGORIES.items()}
    n_tokens = splice.get("n_tokens") or metrics.get("n_tokens")
    categories["token_stats"] = {"total_tokens_eval_reconstruction": n_tokens,
                                 "total_tokens_eval_sparsity_variance": n_tokens}
    categories["misc_metrics"] = {name: _lookup(name, per_model, metrics) for name in MISC}
    categories["misc_metrics"]["frac_alive"] = frac_alive(metrics)
    n_seq = splice.get("n_sequences")
    context = n_tokens // n_seq + 1 if isinstance(n_tokens, int) and n_seq else None
    config = {"model_name": model, "llm_dtype": None, "batch_size_prompts": None,
              "n_eval_reconstruction_batches": None, "n_eval_sparsity_variance_batches": None,
              "dataset": splice.get("tokenset_id"), "context_size": context,
              "compute_kl": True, "compute_ce_loss": True, "compute_l2_norms": True,
              "compute_sparsity_metrics": True, "compute_variance_metrics": True,
              "compute_featurewise_density_statistics": False, "compute_featurewise_weight_based_metrics": False,
              "exclude_special_tokens_from_reconstruction": True, "verbose": False,
              "n_sequences": n_seq, "splice": splice.get("splice")}
    unstructured = {name: per_model.get(name) for name in UNSTRUCTURED}
    unstructured["definitions"] = ("explained_variance: pooled, 1 - sum ||x - x_hat||^2 / sum ||x - mean||^2; "
                                   "explained_variance_legacy: per-token mean (SAEBench paper tables); "
                                   "mse: mean over tokens of the squared error summed over dimensions; "
                                   "normalized units; position 0 (BOS) excluded")
    meta = {**meta, "experiment": meta.get("experiment") or splice.get("experiment")}
    return envelope(EVAL_TYPE_CORE, config, categories, [], unstructured, meta, result_key(splice, model), model)
