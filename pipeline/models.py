"""Loading a checkpoint for inference: on its device, in its compute dtype, hookable, and named.

`load_model` reads the config first and refuses an architecture mdiff cannot hook before any
weights are read, then loads the weights from the source `pipeline.checkpoints` locates (a hub
revision pinned to its commit, a directory, a GGUF file) and returns them with the identity and
key (`pipeline.identity`) that everything cached from them is filed under. `preflight` makes the
same checks from the config alone, before a token set is built.

The other jobs on a model have modules of their own: hook points and reading or editing the
residual stream (`pipeline.hooks`), identity and keys (`pipeline.identity`), tokenizers
(`pipeline.tokenizer`). Their public names are imported here too, so that `from pipeline import
models as M` reaches everything a stage needs from a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.checkpoints import ModelLoadError, from_pretrained, hub_cache_dir, locate, where
from pipeline.config import HookSpec, ModelSpec
from pipeline.hooks import (
    DECODER_LAYER_PATHS,
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_SITES,
    UnsupportedModelError,
    capture,
    check_architecture,
    decoder_layers,
)
from pipeline.identity import dtype_name, model_identity, model_key, source_identity
from pipeline.tokenizer import (
    TokenizerMismatchError,
    check_same_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    vocabulary_fingerprint,
)

__all__ = [
    "DECODER_LAYER_PATHS", "SUPPORTED_ARCHITECTURES", "SUPPORTED_SITES", "LoadedModel", "ModelLoadError",
    "TokenizerMismatchError", "UnsupportedModelError", "capture", "check_architecture",
    "check_same_tokenizer", "decoder_layers", "load_model", "load_tokenizer",
    "model_identity", "model_key", "preflight", "resolve_device", "resolve_dtype", "tokenizer_fingerprint",
    "vocabulary_fingerprint",
]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' is this process's GPU (LOCAL_RANK under torchrun) so that one config serves every rank."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from e


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on GPU (fast, what models are trained in) and float32 on CPU (bf16 is slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype in ("float32", "bfloat16"):
        return getattr(torch, dtype)
    raise ValueError(f"compute dtype {dtype!r} is not supported; use auto, float32 or bfloat16")


def _dtype_kwarg() -> str:
    """transformers renamed `torch_dtype` to `dtype` in 4.56 and warns about the old name."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


@dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    model: nn.Module  # eval mode, requires_grad False, on its device, in its compute dtype
    d_model: int
    n_layers: int
    architecture: str  # config.model_type
    identity: dict
    key: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def load_model(spec: ModelSpec, device: str | torch.device | None = None,
               cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Load a checkpoint for inference; the architecture is checked from the config before any weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    target = resolve_device(spec.device if device is None else device)
    dtype = resolve_dtype(spec.dtype, target)
    cache = hub_cache_dir(cache_dir)
    name_or_path, kwargs, commit = locate(spec, cache)
    config = from_pretrained(spec, "config", AutoConfig, name_or_path, kwargs, cache)
    architecture = check_architecture(getattr(config, "model_type", None), spec.name)
    identity = {**source_identity(spec, cache, commit), "dtype": dtype_name(dtype)}
    model = from_pretrained(spec, "weights", AutoModelForCausalLM, name_or_path,
                            {**kwargs, "config": config, _dtype_kwarg(): dtype}, cache)
    # Only the device: a dtype cast here would also cast float32 buffers (rotary inv_freq) that
    # from_pretrained deliberately keeps in float32.
    model = model.to(target).eval().requires_grad_(False)
    return LoadedModel(
        spec=spec, model=model, d_model=int(config.hidden_size),
        n_layers=len(decoder_layers(model)), architecture=architecture,
        identity=identity, key=model_key(identity),
    )


def preflight(spec: ModelSpec, hooks: list[HookSpec], cache_dir: str | os.PathLike | None = None):
    """Refuse an unsupported architecture or an out-of-range hook from the config alone, before a
    token set is built or any weights are read."""
    from transformers import AutoConfig

    cache = hub_cache_dir(cache_dir)
    name_or_path, kwargs, _ = locate(spec, cache)
    config = from_pretrained(spec, "config", AutoConfig, name_or_path, kwargs, cache)
    check_architecture(getattr(config, "model_type", None), spec.name)
    n_layers = int(config.num_hidden_layers)
    for hook in hooks:
        if not 0 <= hook.layer < n_layers:
            raise ValueError(
                f"hook {hook.label}: model {spec.name!r} ({where(spec)}) has {n_layers} layers, so "
                f"[[hooks]] layer must be in 0..{n_layers - 1}, got layer {hook.layer}"
            )
    return config
