"""SAELens SAEs: `cfg.json` + `sae_weights.safetensors`, read into our layout and written from it.

The format (SAELens 6; the flat configs of earlier versions are read too):

    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in];
                              jumprelu: threshold [d_sae]; gated: b_gate, r_mag, b_mag instead of
                              b_enc; a batchtopk training checkpoint: topk_threshold (a scalar)
    cfg.json                  architecture, d_in, d_sae, dtype, apply_b_dec_to_input,
                              normalize_activations, reshape_activations, k and
                              rescale_acts_by_decoder_norm (topk / batchtopk), metadata {model_name,
                              hook_name, ...}

and SAELens' forward on an activation x:

    sae_in = x - b_dec * apply_b_dec_to_input
    pre    = sae_in @ W_enc + b_enc
    standard   f = relu(pre)
    jumprelu   f = relu(pre) * (pre > threshold)
    topk       f = relu of the k largest of pre (of pre * ||W_dec_j|| with rescale_acts_by_decoder_norm,
               whose decode then divides f by ||W_dec_j||)
    gated      f = (sae_in @ W_enc + b_gate > 0) * relu(sae_in @ (W_enc * exp(r_mag)) + b_mag)
    x_hat  = f @ W_dec + b_dec

Every one of these is one of our architectures after an exact change of parameters (see `read`).
`normalize_activations`: "none" reads raw activations; "expected_average_only_in" weights were
trained on c * x, and SAELens' own `load_from_disk` applies them to x unchanged (only
`from_pretrained` folds a release's `norm_scaling_factor`): we do the same unless the factor is
given as the input scale ("covariance_whitening": likewise applied unchanged). "constant_norm_rescale"
and "layer_norm" rescale every token by its own norm or statistics, which no linear
encoder/decoder can hold: refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline import hook_names
from pipeline.records import sha256_file
from trainer.dictionaries import Dictionary

from .common import ForeignDictionary, FormatError, absorb_b_dec, assemble, check_keys, positive_scales

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"  # the SAELens config layout written by `export` (metadata nested)
_RENAMED = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
            "activation_fn_str": "activation_fn"}
_FINETUNING = {"scaling_factor", "finetuning_scaling_factor"}
_TENSORS = {  # architecture -> (required, optional) tensor names
    "standard": ({"W_enc", "b_enc", "W_dec", "b_dec"}, _FINETUNING),
    "topk": ({"W_enc", "b_enc", "W_dec", "b_dec"}, _FINETUNING),
    "jumprelu": ({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, _FINETUNING),
    "gated": ({"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}, _FINETUNING),
    "batchtopk": ({"W_enc", "b_enc", "W_dec", "b_dec", "topk_threshold"}, _FINETUNING),
}


def is_saelens(path: Path) -> bool:
    return path.is_dir() and (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def flat_config(cfg: dict) -> dict:
    """One flat dict for both layouts: SAELens 6 nests model facts under `metadata`; earlier
    versions kept them at the top level under some other names."""
    flat = {_RENAMED.get(k, k): v for k, v in cfg.items() if k not in ("metadata", "meta")}
    for key, value in (cfg.get("metadata") or cfg.get("meta") or {}).items():
        flat.setdefault(_RENAMED.get(key, key), value)
    if "k" not in flat and isinstance(flat.get("activation_fn_kwargs"), dict):
        if "k" in flat["activation_fn_kwargs"]:
            flat["k"] = flat["activation_fn_kwargs"]["k"]
    norm = flat.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:  # older configs: a flag, or absent
        flat["normalize_activations"] = "expected_average_only_in" if norm else "none"
    flat.setdefault("architecture", "standard")
    if flat["architecture"] == "standard" and flat.get("activation_fn") == "topk":
        flat["architecture"] = "topk"  # before SAELens 6, TopK SAEs were "standard" + a topk activation
    flat.setdefault("apply_b_dec_to_input", True)
    return flat


def _input_scales(norm: str, input_scales: list[float] | None, where: Path) -> tuple[list[float], list[str]]:
    """The constant the SAE's inputs are multiplied by, from `normalize_activations`."""
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise FormatError(
            f"{where}: normalize_activations = {norm!r} rescales every token by its own norm (or mean "
            "and std) before encoding and undoes it after decoding; that per-token, nonlinear step "
            "has no place in a linear encoder/decoder, so importing would change what the SAE "
            "computes. Importable: 'none', 'expected_average_only_in', 'covariance_whitening'")
    scales = positive_scales(input_scales or [1.0], 1, "input scale")
    if norm == "expected_average_only_in":
        return scales, ["normalize_activations 'expected_average_only_in': " + (
            f"inputs scaled by {scales[0]} (the given norm scaling factor)" if input_scales
            else "weights read as raw-activation weights, as SAELens' load_from_disk does")]
    if norm == "covariance_whitening":
        if input_scales:
            raise FormatError(f"{where}: a whitening is a matrix, not an input scale; SAELens folds it "
                              "into the weights (fold_activation_whitening) before saving")
        return scales, ["normalize_activations 'covariance_whitening': weights applied unchanged, as "
                        "SAELens' load_from_disk does (the whitening is folded in when training ends)"]
    if norm != "none":
        raise FormatError(f"{where}: unknown normalize_activations {norm!r}")
    return scales, []


def read(path: str | Path, input_scales: list[float] | None = None) -> ForeignDictionary:
    """A SAELens SAE directory as our (one-model) dictionary in its input units.

    `input_scales`: the constant c the SAE's inputs were multiplied by in training (its
    `norm_scaling_factor`), for `normalize_activations = "expected_average_only_in"` weights that
    were saved unfolded; default 1 (raw activations), which is what SAELens' `load_from_disk` does.
    """
    path = Path(path)
    if not is_saelens(path):
        raise FormatError(f"{path}: not a SAELens SAE directory (needs {CFG_FILE} and {WEIGHTS_FILE})")
    raw_cfg = json.loads((path / CFG_FILE).read_text(encoding="utf-8"))
    cfg = flat_config(raw_cfg)
    where = str(path / WEIGHTS_FILE)
    tensors = {k: v.to(torch.float32) for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
    arch = cfg["architecture"]
    if arch not in _TENSORS:
        raise FormatError(f"{path / CFG_FILE}: architecture {arch!r} has no counterpart here; "
                          f"importable: {', '.join(sorted(_TENSORS))}")
    check_keys(tensors, *_TENSORS[arch], where)
    if cfg.get("reshape_activations", "none") not in ("none", None) or cfg.get("hook_head_index") is not None:
        raise FormatError(f"{path / CFG_FILE}: an SAE on attention heads (hook_z / hook_head_index) "
                          "is not a residual-stream dictionary")
    d_in, d_sae = tensors["W_enc"].shape
    if (cfg.get("d_in"), cfg.get("d_sae")) not in ((None, None), (d_in, d_sae)):
        raise FormatError(f"{path}: cfg.json says d_in {cfg.get('d_in')}, d_sae {cfg.get('d_sae')}, "
                          f"but W_enc is [{d_in}, {d_sae}]")
    scales, notes = _input_scales(cfg["normalize_activations"], input_scales, path / CFG_FILE)

    W_enc, W_dec, b_dec = tensors["W_enc"], tensors["W_dec"], tensors["b_dec"]
    threshold, k = None, None
    if arch == "gated":
        # gate: sae_in W + b_gate > 0  <=>  pre' = sae_in (W e^r) + b_mag > b_mag - e^r b_gate
        # (multiplying by e^r > 0 keeps the inequality), and f = relu(pre'): a JumpReLU
        gain = tensors["r_mag"].exp()
        W_enc, b_enc = W_enc * gain, tensors["b_mag"]
        threshold = tensors["b_mag"] - gain * tensors["b_gate"]
        notes.append("gated: magnitude path as a JumpReLU with threshold b_mag - exp(r_mag) * b_gate")
    else:
        b_enc = tensors["b_enc"]
    if arch in ("topk", "batchtopk"):
        k = None if cfg.get("k") is None else int(round(float(cfg["k"])))  # batchtopk k may be a float
        if arch == "topk" and not k:
            raise FormatError(f"{path / CFG_FILE}: a topk SAE needs k")
        if cfg.get("rescale_acts_by_decoder_norm"):
            # top-k of pre * n_j, decoded with W_dec_j / n_j: fold n into the encoder
            n = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
            notes.append("rescale_acts_by_decoder_norm folded into the encoder")
    sf = next((tensors[name] for name in _FINETUNING if name in tensors), None)
    if sf is not None and not torch.all(sf == 1):
        W_dec = W_dec * sf[:, None]
        notes.append("finetuning scaling factor folded into W_dec")
    W_enc, b_dec = W_enc[None], b_dec[None]
    if not cfg["apply_b_dec_to_input"]:
        b_enc = absorb_b_dec(W_enc, b_enc, b_dec)
        notes.append("apply_b_dec_to_input false: b_dec @ W_enc added to b_enc")
    ours = {"standard": "relu", "gated": "jumprelu"}.get(arch, arch)
    if arch == "jumprelu":
        threshold = tensors["threshold"]
    elif arch == "batchtopk":
        threshold = float(tensors["topk_threshold"])
    dictionary = assemble(ours, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec[:, None], b_dec=b_dec,
                          k=k, threshold=threshold, name=path.name, where=where)
    return ForeignDictionary(
        dictionary, scales, "saelens", arch, str(path),
        {name: sha256_file(path / name) for name in (CFG_FILE, WEIGHTS_FILE)}, raw_cfg,
        hook=hook_names.from_transformerlens(cfg.get("hook_name")), hook_name=cfg.get("hook_name"),
        model_names=[cfg["model_name"]] if cfg.get("model_name") else [], notes=notes)


def export(dictionary: Dictionary, out_dir: str | Path, *, hook: str, model_name: str | None = None,
           context_size: int | None = None, provenance: dict | None = None) -> Path:
    """Write a one-model dictionary as a SAELens SAE on RAW activations.

    Scales are folded in (normalize_activations "none"), so SAELens applied to the model's
    activations at `hook` reconstructs what our dictionary reconstructs, in raw units. relu ->
    "standard", topk -> "topk", jumprelu -> "jumprelu", and batchtopk -> "jumprelu" with its
    inference threshold on every latent (as SAELens saves its own BatchTopK SAEs; a threshold not
    yet estimated, below 0, keeps every positive code: threshold 0). `provenance` goes to
    `mdiff_export.json` beside the SAE, which SAELens ignores.
    """
    if dictionary.n_models != 1:
        raise FormatError(f"SAELens holds SAEs; this is a {dictionary.n_models}-model crosscoder")
    raw = dictionary if dictionary.folded else dictionary.fold_scales()
    tensors = {"W_enc": raw.W_enc[0], "b_enc": raw.b_enc, "W_dec": raw.W_dec[:, 0], "b_dec": raw.b_dec[0]}
    arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu",
            "jumprelu": "jumprelu"}[raw.architecture]
    extra: dict = {}
    if raw.architecture == "topk":
        extra = {"k": int(raw.spec.k), "rescale_acts_by_decoder_norm": False}
    elif raw.architecture == "batchtopk":
        tensors["threshold"] = raw.threshold.clamp_min(0).expand(raw.n_latents)
    elif raw.architecture == "jumprelu":
        tensors["threshold"] = raw.threshold
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    hook_name = hook_names.to_transformerlens(hook)
    cfg = {"architecture": arch, "d_in": raw.d_model, "d_sae": raw.n_latents, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", **extra,
           "metadata": {"model_name": model_name, "hook_name": hook_name,
                        "hook_layer": int(hook_name.split(".")[1]), "hook_head_index": None,
                        "context_size": context_size,
                        "sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": None}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CFG_FILE).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    if provenance is not None:
        (out / "mdiff_export.json").write_text(json.dumps(provenance, indent=2), encoding="utf-8")
    return out

