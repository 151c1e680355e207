"""Where a hook point is in a model, and how to read or replace the residual stream there.

A hook point (`HookSpec`: a decoder layer and a site) is the input (`resid_pre`) or the output
(`resid_post`) of one decoder layer, found through the architecture table below. Caching reads it
(`capture`), splice evaluations and analyses replace it (`editing_residual`), and both go through
the one torch hook of `_hook_site`, so the two always agree on which tensor a hook point is, for
every supported architecture (hidden states passed positionally or by keyword, layers returning a
tensor or a tuple led by it).

Reading stops the forward as soon as the deepest requested site has been seen: caching layer 6 of
a 24-layer model costs a quarter of a forward pass, and the LM head (often the largest matmul)
never runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pipeline.config import HookSpec

# HF `config.model_type` -> attribute path of the ModuleList of decoder layers.
DECODER_LAYER_PATHS: Mapping[str, str] = MappingProxyType({
    "gpt_neox": "gpt_neox.layers",
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "bloom": "transformer.h",
    "gpt2": "transformer.h",
})
SUPPORTED_ARCHITECTURES = tuple(sorted(DECODER_LAYER_PATHS))
SUPPORTED_SITES = ("resid_pre", "resid_post")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture has no known decoder-layer path, so it cannot be hooked."""


class _StopForward(Exception):
    """Raised by the deepest hook so that nothing past it runs; never escapes `capture()`."""


def _supported_text() -> str:
    return (f"supported architectures (config.model_type): {', '.join(SUPPORTED_ARCHITECTURES)}; "
            f"supported sites: {', '.join(SUPPORTED_SITES)}")


def check_architecture(model_type: str | None, name: str) -> str:
    """Refuse unsupported models early: before their weights are read, not after an hour of loading."""
    if model_type not in DECODER_LAYER_PATHS:
        raise UnsupportedModelError(
            f"model {name!r} has architecture {model_type!r}, which mdiff cannot hook; "
            f"{_supported_text()}. Add its decoder-layer path to pipeline.models.DECODER_LAYER_PATHS "
            "if it is a standard pre-norm decoder."
        )
    return model_type


def model_name(model: nn.Module) -> str:
    """How messages name a loaded model: its checkpoint's name or path, else its class."""
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or type(model).__name__


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, whose inputs and outputs are the residual stream."""
    name = model_name(model)
    model_type = check_architecture(getattr(getattr(model, "config", None), "model_type", None), name)
    module: Any = model
    for attr in DECODER_LAYER_PATHS[model_type].split("."):
        module = getattr(module, attr, None)
        if module is None:
            raise UnsupportedModelError(
                f"model {name!r} ({type(model).__name__}) has no {DECODER_LAYER_PATHS[model_type]!r}: "
                "load it with AutoModelForCausalLM (a causal LM, not a base or wrapped model); "
                f"{_supported_text()}"
            )
    if not isinstance(module, nn.ModuleList):
        raise UnsupportedModelError(
            f"model {name!r}: {DECODER_LAYER_PATHS[model_type]!r} is a {type(module).__name__}, not a "
            "ModuleList of decoder layers"
        )
    return module


def _check_site(hook: HookSpec) -> None:
    if hook.site not in SUPPORTED_SITES:
        raise ValueError(f"hook {hook.label}: unknown site {hook.site!r}; use one of {SUPPORTED_SITES}")


def _check_hooks(model: nn.Module, hooks: list[HookSpec], n_layers: int) -> None:
    if not hooks:
        raise ValueError("capture() needs at least one HookSpec, e.g. HookSpec(layer=0)")
    for hook in hooks:
        _check_site(hook)
        if not 0 <= hook.layer < n_layers:
            raise ValueError(
                f"hook {hook.label}: model {model_name(model)!r} has {n_layers} layers, so the layer "
                f"must be in 0..{n_layers - 1}, got {hook.layer}"
            )


def _hook_site(layer: nn.Module, site: str,
               fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
    """Call fn(h) with the residual stream h at `site` of the decoder layer `layer`; when fn returns
    a tensor, it replaces h there. Returns the hook's handle.

    resid_pre: transformers 5 passes hidden states positionally; older or custom code may pass a
    keyword. resid_post: most layers return a Tensor; bloom (and transformers 4) return a tuple led
    by it, which stays a tuple.
    """
    if site == "resid_pre":
        def pre(_m, args, kwargs):
            h = fn(args[0] if args else kwargs["hidden_states"])
            if h is None:
                return None
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}
        return layer.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_m, _args, output):
        single = isinstance(output, torch.Tensor)
        h = fn(output if single else output[0])
        if h is None:
            return None
        return h if single else (h, *output[1:])
    return layer.register_forward_hook(post)


def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    hooks: list[HookSpec],
    attention_mask: torch.Tensor | None = None,
    *,
    detach: bool = True,
) -> dict[HookSpec, torch.Tensor]:
    """Residual-stream activations at `hooks`, running only as much of the model as they need.

    resid_pre of layer L is exactly `output_hidden_states[L]` and resid_post is `[L + 1]` (for L
    below the last layer; the last entry of output_hidden_states has the final norm applied, which
    resid_post of the last layer does not). Tensors are returned as produced (no copy); with
    `detach=False` they keep their graph, for losses on activations (the fine-tune's anchor).
    """
    layers = decoder_layers(model)
    _check_hooks(model, hooks, len(layers))
    wanted = set(hooks)
    deepest = max(h.layer for h in wanted)
    # Stop at the deepest layer's input when only its resid_pre is wanted: that layer never runs.
    stop_site = "resid_post" if HookSpec(deepest, "resid_post") in wanted else "resid_pre"
    captured: dict[HookSpec, torch.Tensor] = {}

    def record(spec: HookSpec, hidden: torch.Tensor) -> None:
        captured[spec] = hidden.detach() if detach else hidden
        if spec.layer == deepest and spec.site == stop_site:
            raise _StopForward

    handles = []
    try:
        for layer in sorted({h.layer for h in wanted}):
            for site in SUPPORTED_SITES:
                if HookSpec(layer, site) in wanted:
                    spec = HookSpec(layer, site)
                    handles.append(_hook_site(layers[layer], site, lambda h, spec=spec: record(spec, h)))
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    missing = wanted - captured.keys()
    if missing:
        raise RuntimeError(
            f"model {model_name(model)!r} never ran the hooked layers for "
            f"{sorted(h.label for h in missing)}: its forward does not call its decoder layers as "
            "modules, so mdiff cannot hook it"
        )
    return {h: captured[h] for h in hooks}


@contextmanager
def editing_residual(model: nn.Module, hook: HookSpec,
                     edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, every forward of `model` has the residual stream h at `hook` replaced by
    edit(h) (the whole [batch, T, d] tensor; the rest of the model sees what edit returns)."""
    layer = decoder_layers(model)[hook.layer]
    _check_site(hook)
    handle = _hook_site(layer, hook.site, edit)
    try:
        yield
    finally:
        handle.remove()
