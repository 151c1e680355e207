"""Crosscoders in the format of the public Gemma-2-2b model-diffing crosscoder (Kissane et al.'s
open replication of Anthropic's crosscoders; code adapted from Neel Nanda's).

The release holds `cfg.json` and `cc_weights.pt` (the trainer's own saves are `<v>.pt` +
`<v>_cfg.json`): a state dict read with `torch.load(weights_only=True)`,

    W_enc [n_models, d_in, d_hidden]    b_enc [d_hidden]
    W_dec [d_hidden, n_models, d_in]    b_dec [n_models, d_in]

and cfg keys such as d_in, dict_size, hook_point (TransformerLens, e.g. blocks.14.hook_resid_pre),
model_name, l1_coeff, dec_init_norm, enc_dtype. The forward on x [batch, n_models, d_in]:

    f     = relu(einsum(x, W_enc, "b n d, n d h -> b h") + b_enc)      (no b_dec subtracted)
    x_hat = einsum(f, W_dec, "b h, h n d -> b n d") + b_dec

Its trainer multiplies each model's activations by a normalization factor (sqrt(d_model) over
their mean norm, estimated at training time) that neither file records, so importing needs those
factors as the input scales.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import hook_names
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

WEIGHTS_FILE = "cc_weights.pt"
CFG_FILE = "cfg.json"


def locate(path: Path) -> tuple[Path, Path] | None:
    """(weights, cfg) of a release folder, or of a trainer save `<v>.pt` + `<v>_cfg.json`."""
    if path.is_dir():
        weights, cfg = path / WEIGHTS_FILE, path / CFG_FILE
    elif path.suffix == ".pt":
        weights = path
        cfg = next((c for c in (path.with_name(f"{path.stem}_cfg.json"), path.with_name(CFG_FILE))
                    if c.is_file()), path.with_name(CFG_FILE))
    else:
        return None
    return (weights, cfg) if weights.is_file() and cfg.is_file() else None


def read(path: str | Path, input_scales: list[float] | None = None) -> ForeignDictionary:
    """The crosscoder at `path` as our relu crosscoder in its input units.

    `input_scales`: the factor each model's activations were multiplied by in training (one per
    model, in W_enc's model order); 1.0 for a crosscoder trained on raw activations. Required.
    """
    path = Path(path)
    found = locate(path)
    if found is None:
        raise FormatError(f"{path}: not a Gemma-crosscoder save (needs {WEIGHTS_FILE} + {CFG_FILE}, "
                          "or <v>.pt + <v>_cfg.json)")
    weights, cfg_path = found
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    state = load_pt_state_dict(weights)
    check_keys(state, {"W_enc", "b_enc", "W_dec", "b_dec"}, set(), str(weights))
    t = {k: v.float() for k, v in state.items()}
    if t["W_enc"].dim() != 3:
        raise FormatError(f"{weights}: W_enc must be [n_models, d_in, d_hidden], "
                          f"got {tuple(t['W_enc'].shape)}")
    n_models = t["W_enc"].shape[0]
    if input_scales is None:
        raise FormatError(
            f"{weights}: this format does not record the normalization factors its trainer multiplied "
            f"each model's activations by; pass them as input scales ({n_models} values in model "
            "order, --input-scales A,B on the command line), or 1.0 if it was trained on raw activations")
    b_enc = absorb_b_dec(t["W_enc"], t["b_enc"], t["b_dec"])
    dictionary = assemble("relu", W_enc=t["W_enc"], b_enc=b_enc, W_dec=t["W_dec"], b_dec=t["b_dec"],
                          name=weights.parent.name, where=str(weights))
    hook_name = cfg.get("hook_point")
    return ForeignDictionary(
        dictionary, positive_scales(input_scales, n_models, "input scales"), "gemma_crosscoder",
        "CrossCoder", str(weights.parent),
        {weights.name: sha256_file(weights), cfg_path.name: sha256_file(cfg_path)}, cfg,
        hook=hook_names.from_transformerlens(hook_name), hook_name=hook_name,
        model_names=[cfg["model_name"]] if isinstance(cfg.get("model_name"), str) else [],
        notes=["encoder does not subtract b_dec: b_dec folded into b_enc"])
