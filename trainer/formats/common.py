"""What every foreign-format converter shares: loading weights without unpickling code, one way
into our layout, and the change of units between a foreign dictionary's inputs and a store's rows.

Units. A foreign dictionary reads ``u_n = c_n * x_n`` for model n, where x is the raw residual
stream and c its own normalization constant (c = 1: it reads raw activations), and reconstructs in
the same units. Our store holds ``v_n = s_n * x_n``. With ``a_n = c_n / s_n`` we have ``u = a v``,
so the dictionary for store rows is exactly the foreign one "trained on a * v", folded by a:
``Dictionary.fold_scales(a)`` (W_enc[n] *= a_n, b_dec[n] /= a_n, W_dec[:, n] /= a_n and the
decoder-norm factor *= a_n). Pre-activations, and so every threshold and every top-k choice, are
unchanged; the reconstruction comes out in store units. Raw units are the case s = 1.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import einsum
from torch import Tensor

from trainer.config import DictionarySpec
from trainer.dictionaries import Dictionary, build_dictionary


class FormatError(ValueError):
    """A foreign file that is not what its format says, or that our dictionary layout cannot hold."""


@dataclass
class ForeignDictionary:
    """A foreign dictionary converted to our layout, still in the foreign dictionary's input units."""

    dictionary: Dictionary  # reads c_n * (raw activations of model n); scales 1, not folded
    input_scales: list[float]  # c_n: 1.0 where the foreign dictionary reads raw activations
    format: str  # "saelens" | "dictionary_learning" | "gemma_crosscoder"
    kind: str  # the foreign architecture or class name
    path: str
    files: dict[str, str]  # file name -> sha256 of the files read
    config: dict  # the foreign config as read
    hook: str | None = None  # our hook label, when the foreign hook name maps to one
    hook_name: str | None = None  # the hook as the foreign config names it
    model_names: list[str] = field(default_factory=list)  # as the foreign config names them
    notes: list[str] = field(default_factory=list)  # conversions applied, for the provenance

    def on_raw(self) -> Dictionary:
        """The dictionary for raw activations (folded: what `fold_scales()` gives for ours)."""
        return self.dictionary.fold_scales(self.input_scales)

    def on_store(self, store_scales: list[float]) -> Dictionary:
        """The dictionary for rows of arrays with these scales (stored = raw * scale)."""
        if len(store_scales) != len(self.input_scales):
            raise FormatError(f"{len(store_scales)} store scales for a dictionary over "
                              f"{len(self.input_scales)} models")
        ratios = [c / s for c, s in zip(self.input_scales, store_scales, strict=True)]
        out = self.dictionary.fold_scales(ratios)
        out.scales, out.folded = [float(s) for s in store_scales], False
        return out

    def provenance(self) -> dict:
        """What `config.json` records under `imported_from` (see storage_layout.md)."""
        return {"format": self.format, "kind": self.kind, "path": self.path, "files": self.files,
                "hook_name": self.hook_name, "model_names": self.model_names,
                "input_scales": self.input_scales, "notes": self.notes, "config": self.config}


def load_pt_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A .pt state dict through `torch.load(weights_only=True)`: tensors and plain containers only.

    Anything else (a pickled module, a class instance, a callable) is refused, never executed.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(
            f"{path}: refused: it holds pickled Python objects, not just tensors ({first}). Only plain "
            "state dicts are loaded, with torch.load(weights_only=True), so that opening a file cannot "
            "run code; re-save it in the code that wrote it with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                            for k, v in obj.items()):
        raise FormatError(f"{path}: expected a state dict (a dict of name -> tensor), got "
                          f"{type(obj).__name__}; save model.state_dict(), not the model")
    return obj


def check_keys(tensors: dict[str, Tensor], required: set[str], optional: set[str], where: str) -> None:
    """Refuse missing tensors and unknown ones: an unknown bias silently dropped is a wrong import."""
    missing = sorted(required - set(tensors))
    unknown = sorted(set(tensors) - required - optional)
    if missing or unknown:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
        raise FormatError(f"{where}: {'; '.join(parts)} (expected {sorted(required)}"
                          f"{f' and optionally {sorted(optional)}' if optional else ''})")


def absorb_b_dec(W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """b_enc for our encoder, which subtracts b_dec first, from one that does not.

    x W + b  ==  (x - b_dec) W + (b + b_dec W); computed in float64 so the sum adds no rounding
    beyond the final cast.
    """
    shift = einsum(b_dec.double(), W_enc.double(), "n d, n d m -> m")
    return (b_enc.double() + shift).to(b_enc.dtype)


def assemble(architecture: str, *, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
             name: str, k: int | None = None, threshold: Tensor | float | None = None,
             where: str) -> Dictionary:
    """Our dictionary holding exactly these float32 tensors.

    W_enc [n, d, m], b_enc [m], W_dec [m, n, d], b_dec [n, d]; `threshold` is the inference
    threshold of batchtopk (a scalar) or the per-latent thresholds of jumprelu ([m], values <= 0
    meaning "every positive pre-activation passes", which is threshold 0).
    """
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    tensors = {key: t.detach().to("cpu", torch.float32) for key, t in tensors.items()}
    if tensors["W_enc"].dim() != 3:
        raise FormatError(f"{where}: W_enc must be [n_models, d_model, n_latents], got "
                          f"{tuple(tensors['W_enc'].shape)}")
    n, d, m = tensors["W_enc"].shape
    expected = {"b_enc": (m,), "W_dec": (m, n, d), "b_dec": (n, d)}
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise FormatError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, expected {shape} "
                              f"for {n} model(s), d_model {d} and {m} latents")
    bad = [key for key, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise FormatError(f"{where}: non-finite values in {bad}")
    spec = DictionarySpec(name=name, architecture=architecture, n_latents=m, k=k)
    out = build_dictionary(spec, n, d)
    with torch.no_grad():
        for key, t in tensors.items():
            getattr(out, key).copy_(t)
    out.set_threshold_(threshold)
    return out.eval()


def positive_scales(values, n_models: int, what: str) -> list[float]:
    """Validate per-model normalization constants (one value is used for every model)."""
    scales = [float(v) for v in values]
    if len(scales) == 1:
        scales *= n_models
    if len(scales) != n_models or not all(math.isfinite(s) and s > 0 for s in scales):
        raise FormatError(f"{what}: need {n_models} positive finite value(s) (one per model, or one "
                          f"for all), got {list(values)}")
    return scales
