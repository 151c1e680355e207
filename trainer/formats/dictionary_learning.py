"""dictionary_learning dictionaries: `ae.pt` (a state dict) + `config.json` ({"trainer": {...}}).

`config.json["trainer"]["dict_class"]` names the class; its state dict and forward (as in
dictionary_learning 0.1.0 and the science-of-finetuning CrossCoder), with x the activation:

    AutoEncoder           bias [d], encoder.{weight [m, d], bias [m]}, decoder.weight [d, m]
                          f = relu(encoder(x - bias)),           x_hat = decoder(f) + bias
    AutoEncoderNew        encoder.{weight, bias}, decoder.{weight, bias}
                          f = relu(encoder(x)),                  x_hat = decoder(f)
    GatedAutoEncoder      decoder_bias, encoder.weight, r_mag, gate_bias, mag_bias, decoder.weight
                          f = (enc(x - b) + gate_bias > 0) * relu(exp(r_mag) enc(x - b) + mag_bias)
    JumpReluAutoEncoder   W_enc [d, m], b_enc, W_dec [m, d], b_dec, threshold [m]
                          f = relu(pre * (pre > threshold)), pre = x @ W_enc + b_enc  (b_dec is
                          not subtracted: apply_b_dec_to_input is False unless loaded from SAELens)
    AutoEncoderTopK       encoder.{weight, bias}, decoder.weight, b_dec, k, threshold
                          f = the k largest of relu(encoder(x - b_dec)) per token
    BatchTopKSAE          as AutoEncoderTopK; inference keeps relu(...) > threshold
    MatryoshkaBatchTopKSAE  W_enc [d, m], b_enc, W_dec [m, d], b_dec, k, threshold, group_sizes
                          as BatchTopKSAE (all groups active)
    CrossCoder            encoder.{weight [L, d, m], bias [m]}, decoder.{weight [L, m, d], bias [L, d]}
                          f = relu(sum_l x_l @ W_l + bias),      x_hat_l = f @ W_dec_l + bias_l
    BatchTopKCrossCoder   + k, threshold; inference keeps f where f * sum_l ||W_dec_l[j]|| > threshold

dictionary_learning folds its activation normalization into the weights before saving (`trainSAE`
scales the biases by `norm_factor`), so `ae.pt` reads raw activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from einops import rearrange

from pipeline.records import sha256_file

from .common import (
    ForeignDictionary,
    FormatError,
    absorb_b_dec,
    assemble,
    check_keys,
    load_pt_state_dict,
    positive_scales,
)

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
_CROSSCODER_NORM = 1  # CodeNormalization.CROSSCODER: codes ranked by f * sum_l ||W_dec_l[j]||
_LINEAR = {"encoder.weight", "encoder.bias", "decoder.weight"}
_KEYS = {  # dict_class -> (required, optional) state-dict keys
    "AutoEncoder": (_LINEAR | {"bias"}, set()),
    "AutoEncoderNew": (_LINEAR | {"decoder.bias"}, set()),
    "GatedAutoEncoder": ({"decoder_bias", "encoder.weight", "r_mag", "gate_bias", "mag_bias",
                          "decoder.weight"}, set()),
    "JumpReluAutoEncoder": ({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, set()),
    "AutoEncoderTopK": (_LINEAR | {"b_dec", "k"}, {"threshold"}),
    "BatchTopKSAE": (_LINEAR | {"b_dec", "k", "threshold"}, set()),
    "MatryoshkaBatchTopKSAE": ({"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"}, set()),
    "CrossCoder": (_LINEAR | {"decoder.bias"}, {"code_normalization_id"}),
    "BatchTopKCrossCoder": (_LINEAR | {"decoder.bias", "k", "threshold"}, {"code_normalization_id"}),
}


def locate(path: Path) -> Path | None:
    """The ae.pt of a dictionary_learning save folder (or the file itself)."""
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    return weights if weights.name == WEIGHTS_FILE and weights.is_file() else None


def _hook(trainer: dict) -> str | None:
    """dictionary_learning trains on a layer's output (`submodule_name` like resid_post_layer_8)."""
    layer, name = trainer.get("layer"), str(trainer.get("submodule_name") or "")
    if not isinstance(layer, int):
        return None
    if "resid_pre" in name:
        return f"layer{layer}.resid_pre"
    if "resid_post" in name or not name:
        return f"layer{layer}.resid_post"
    return None


def read(path: str | Path, input_scales: list[float] | None = None) -> ForeignDictionary:
    """A dictionary_learning save folder (or its ae.pt) as our dictionary in its input units."""
    path = Path(path)
    weights = locate(path)
    if weights is None:
        raise FormatError(f"{path}: no {WEIGHTS_FILE} (a dictionary_learning save folder holds "
                          f"{WEIGHTS_FILE} and {CONFIG_FILE})")
    config_path = weights.with_name(CONFIG_FILE)
    if not config_path.is_file():
        raise FormatError(f"{weights}: no {CONFIG_FILE} beside it; dictionary_learning writes one that "
                          "names the dict_class, which the state dict alone cannot tell")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    trainer = config.get("trainer") or {}
    cls = trainer.get("dict_class")
    if cls not in _KEYS:
        raise FormatError(f"{config_path}: dict_class {cls!r} is not importable; importable: "
                          f"{', '.join(sorted(_KEYS))}")
    state = {k.removeprefix("_orig_mod."): v for k, v in load_pt_state_dict(weights).items()}
    check_keys(state, *_KEYS[cls], str(weights))
    t = {k: v.float() for k, v in state.items() if v.is_floating_point()}
    notes: list[str] = []
    threshold, k = None, None
    if cls in ("CrossCoder", "BatchTopKCrossCoder"):
        W_enc, b_enc = t["encoder.weight"], t["encoder.bias"]
        W_dec, b_dec = rearrange(t["decoder.weight"], "l m d -> m l d"), t["decoder.bias"]
        norm_id = int(state.get("code_normalization_id", torch.tensor(_CROSSCODER_NORM)))
        if cls == "BatchTopKCrossCoder" and (norm_id != _CROSSCODER_NORM or t["threshold"].dim() != 0):
            raise FormatError(f"{weights}: BatchTopKCrossCoder with code normalization id {norm_id} "
                              "(or per-layer thresholds) ranks codes otherwise than by "
                              "f * sum_l ||W_dec_l[j]||, the only ranking here (CROSSCODER, id 1)")
        b_enc = absorb_b_dec(W_enc, b_enc, b_dec)
        notes.append("crosscoder encoder does not subtract the decoder bias: folded into b_enc")
    elif cls in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        W_enc, b_enc, W_dec, b_dec = t["W_enc"][None], t["b_enc"], t["W_dec"][:, None], t["b_dec"][None]
        if cls == "JumpReluAutoEncoder":
            b_enc = absorb_b_dec(W_enc, b_enc, b_dec)
            notes.append("apply_b_dec_to_input false: b_dec @ W_enc added to b_enc")
    elif cls == "GatedAutoEncoder":
        gain = t["r_mag"].exp()
        W_enc = (t["encoder.weight"].T * gain)[None]
        b_enc, threshold = t["mag_bias"], t["mag_bias"] - gain * t["gate_bias"]
        W_dec, b_dec = t["decoder.weight"].T[:, None], t["decoder_bias"][None]
        notes.append("gated: magnitude path as a JumpReLU with threshold mag_bias - exp(r_mag) * gate_bias")
    else:
        W_enc, b_enc = t["encoder.weight"].T[None], t["encoder.bias"]
        W_dec = t["decoder.weight"].T[:, None]
        b_dec = t.get("bias", t.get("b_dec", t.get("decoder.bias")))[None]
        if cls == "AutoEncoderNew":
            b_enc = absorb_b_dec(W_enc, b_enc, b_dec)
            notes.append("encoder does not subtract the decoder bias: folded into b_enc")
    arch = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "CrossCoder": "relu",
            "GatedAutoEncoder": "jumprelu", "JumpReluAutoEncoder": "jumprelu",
            "AutoEncoderTopK": "topk"}.get(cls, "batchtopk")
    if arch in ("topk", "batchtopk"):
        k = int(state["k"])
    if cls == "JumpReluAutoEncoder":
        threshold = t["threshold"]
    elif arch == "batchtopk":
        threshold = float(t["threshold"])
    dictionary = assemble(arch, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, k=k,
                          threshold=threshold, name=weights.parent.name, where=str(weights))
    lm = trainer.get("lm_name")
    hook = _hook(trainer)
    return ForeignDictionary(
        dictionary, positive_scales(input_scales or [1.0], dictionary.n_models, "input scales"),
        "dictionary_learning", cls, str(weights.parent),
        {name: sha256_file(weights.with_name(name)) for name in (WEIGHTS_FILE, CONFIG_FILE)}, config,
        hook=hook, hook_name=trainer.get("submodule_name"),
        model_names=[lm] if isinstance(lm, str) else list(lm or []), notes=notes)
