"""Getting a dictionary: a fresh one for a spec, or a saved one from its folder.

The one place that turns a `DictionarySpec` (or a saved config.json) into an instance of the
architecture the registry names, so training, imports and evaluation all build dictionaries the
same way. The layout lives in trainer/dictionary.py and the architectures in
trainer/architectures.py; the layout's names that callers need beside these two functions
(Dictionary, CONFIG_FILE, WEIGHTS_FILE, ACTIVITY_FILE, TENSOR_TERMS) are re-exported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.architectures import ARCHITECTURES, names, spoken
from trainer.config import DictionarySpec
from trainer.dictionary import ACTIVITY_FILE, CONFIG_FILE, TENSOR_TERMS, WEIGHTS_FILE, Dictionary

__all__ = ["ACTIVITY_FILE", "CONFIG_FILE", "TENSOR_TERMS", "WEIGHTS_FILE", "Dictionary", "build_dictionary",
           "load_dictionary"]


def build_dictionary(spec: DictionarySpec, n_models: int, d_model: int,
                     scales: list[float] | None = None) -> Dictionary:
    """A fresh dictionary for `spec`: an SAE for one model, a crosscoder for several."""
    try:
        cls = ARCHITECTURES[spec.architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {spec.architecture!r}; "
                         f"use one of {', '.join(ARCHITECTURES)}") from None
    if n_models != 1 and not cls.crosscoders:
        raise ValueError(f"{cls.architecture} is available for SAEs only (one model); use "
                         f"{spoken(names(crosscoders=True), 'or')} for crosscoders")
    return cls(spec, n_models, d_model, scales)


def load_dictionary(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Dictionary:
    """Rebuild a saved dictionary from config.json and its safetensors weights (strictly)."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    spec = DictionarySpec(**config["spec"])
    if spec.architecture != config["architecture"]:
        raise ValueError(f"{directory / CONFIG_FILE}: architecture {config['architecture']!r} "
                         f"disagrees with spec.architecture {spec.architecture!r}")
    model = build_dictionary(spec, config["n_models"], config["d_model"], config["scales"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    model.folded = bool(config["folded"])
    return model.to(device)
