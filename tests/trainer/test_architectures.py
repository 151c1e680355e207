"""The architecture registry: one place names each architecture and declares its traits, and the
config checks, the trainer's schedules and `build_dictionary` all read it."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from mdiff.config import parse_config
from pipeline.typed_config import ConfigError
from trainer.architectures import ARCHITECTURES, ReLUDictionary, names, spoken
from trainer.config import Architecture, DictionarySpec
from trainer.dictionaries import Dictionary, build_dictionary


def test_the_config_accepts_exactly_the_registry_names():
    assert get_args(Architecture) == tuple(ARCHITECTURES) == ("relu", "topk", "batchtopk", "jumprelu")
    for name, cls in ARCHITECTURES.items():
        assert issubclass(cls, Dictionary) and cls.architecture == name and cls.label


def test_traits():
    assert names(uses_k=True) == ("topk", "batchtopk")
    assert names(crosscoders=True) == ("relu", "topk", "batchtopk") and names(crosscoders=False) == ("jumprelu",)
    assert names(l1_penalty=True) == names(resamples_dead=True) == ("relu",)
    assert names() == tuple(ARCHITECTURES)
    assert (spoken(["a"]), spoken(["a", "b"]), spoken(["a", "b", "c"], "or")) == ("a", "a and b", "a, b or c")


def _problems(dictionary: dict, models: list[str]) -> str:
    config = {"name": "x", "store": "/tmp/s", "models": [{"name": "a", "path": "/tmp"}, {"name": "b", "path": "/tmp"}],
              "hooks": [{"layer": 1}], "tokens": {"tokenset": "ts-0123456789abcdef"},
              "train": {"models": models, "dictionaries": [{"name": "d", "n_latents": 8, **dictionary}]}}
    with pytest.raises(ConfigError) as e:
        parse_config(config)
    return str(e.value)


@pytest.mark.parametrize("dictionary, models, expected", [
    ({"architecture": "gated"}, ["a"],
     ["architecture: 'gated' is not one of 'relu', 'topk', 'batchtopk', 'jumprelu' (use one of the values listed)"]),
    ({"architecture": "Relu"}, ["a"],
     ["architecture: 'Relu' is not one of 'relu', 'topk', 'batchtopk', 'jumprelu' (did you mean 'relu'?)"]),
    ({"architecture": "topk"}, ["a"],
     ["k: is required for architecture 'topk' (set k, the active latents per token, e.g. k = 32)"]),
    ({"architecture": "relu", "k": 3, "aux_k": 1}, ["a"],
     ["k: is only used by topk and batchtopk, not 'relu' (remove it)",
      "aux_k: is only used by topk and batchtopk, not 'relu' (remove it)"]),
    ({"architecture": "batchtopk", "k": 4, "resample_dead_every": 5}, ["a"],
     ["resample_dead_every: is only used by relu, not 'batchtopk' (remove it (topk and batchtopk revive dead "
      "latents with AuxK))"]),
    ({"architecture": "jumprelu"}, ["a", "b"],
     ["architecture: 'jumprelu' is not available for crosscoders (2 models) (use one of 'relu', 'topk', "
      "'batchtopk', or train.models = [one model] for an SAE)"]),
])
def test_config_checks_follow_the_traits(dictionary, models, expected):
    text = _problems(dictionary, models)
    for part in expected:
        assert f"<config>: train.dictionaries[0].{part}" in text.splitlines(), (part, text)


def test_a_registered_architecture_is_built_from_its_entry(monkeypatch):
    class HalfReLU(ReLUDictionary):
        architecture, label, crosscoders = "half", "Half", False

        def _activate(self, pre, k):
            return torch.relu(pre) / 2

    monkeypatch.setitem(ARCHITECTURES, "half", HalfReLU)
    spec = DictionarySpec(name="h", architecture="half", n_latents=8)
    assert type(build_dictionary(spec, 1, 4)) is HalfReLU and "half" in names(crosscoders=False)
    with pytest.raises(ValueError, match=r"^half is available for SAEs only \(one model\); use relu, topk or "
                                         "batchtopk for crosscoders$"):
        build_dictionary(spec, 2, 4)
    with pytest.raises(ValueError, match="unknown architecture 'gated'; use one of relu, topk, batchtopk, "
                                         "jumprelu, half"):
        build_dictionary(DictionarySpec(name="g", architecture="gated"), 1, 4)
