"""Loading checkpoints, reading their residual stream, and naming exactly what produced it.

Everything downstream (the activation store, the dictionaries trained on it, the evaluations) is keyed
by `model_key(model_identity(...))`, so a cache is reused only when the same weights ran in the same
dtype, and is never confused with another checkpoint's. Hub checkpoints are pinned to the resolved
commit, so a moving branch cannot silently change the activations under a cached key.

Reading activations uses plain torch hooks on the decoder layers and stops the forward as soon as
the deepest requested site has been seen: caching layer 6 of a 24-layer model costs a quarter of a
forward pass, and the LM head (often the largest matmul) never runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from pipeline.config import HookSpec, ModelSpec

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

_HASHED_PATTERNS = ("*.safetensors", "*.bin", "config.json")
_BLOCK = 8 << 20  # bytes read at a time when hashing weights: bounded memory for 10 GB shards
_COMMIT_RE = re.compile(r"snapshots/([0-9a-f]{40})(?:/|$)")
_KEY_CHARS = re.compile(r"[^A-Za-z0-9._@-]+")
_KEY_SLUG_MAX = 60


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture has no known decoder-layer path, so it cannot be hooked."""


class ModelLoadError(RuntimeError):
    """A checkpoint (or its config/tokenizer) could not be loaded; the message says how to fix it."""


class TokenizerMismatchError(ValueError):
    """Two models of one experiment tokenize differently, so their activations are not aligned."""


class _StopForward(Exception):
    """Raised by the deepest hook so that nothing past it runs; never escapes `capture()`."""


# ----------------------------------------------------------------------------------------------
# Architectures and hooking
# ----------------------------------------------------------------------------------------------


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


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or type(model).__name__


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, whose inputs and outputs are the residual stream."""
    name = _model_name(model)
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


def _check_hooks(model: nn.Module, hooks: list[HookSpec], n_layers: int) -> None:
    if not hooks:
        raise ValueError("capture() needs at least one HookSpec, e.g. HookSpec(layer=0)")
    for hook in hooks:
        if hook.site not in SUPPORTED_SITES:
            raise ValueError(f"hook {hook.label}: unknown site {hook.site!r}; use one of {SUPPORTED_SITES}")
        if not 0 <= hook.layer < n_layers:
            raise ValueError(
                f"hook {hook.label}: model {_model_name(model)!r} has {n_layers} layers, so the layer "
                f"must be in 0..{n_layers - 1}, got {hook.layer}"
            )


def _hidden_states_in(args: tuple, kwargs: dict) -> torch.Tensor:
    """transformers 5 passes hidden states positionally; older or custom code may pass a keyword."""
    return args[0] if args else kwargs["hidden_states"]


def _hidden_states_out(output: Any) -> torch.Tensor:
    """Most layers return a Tensor; bloom (and transformers 4) return a tuple led by it."""
    return output if isinstance(output, torch.Tensor) else output[0]


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
            if HookSpec(layer, "resid_pre") in wanted:
                spec = HookSpec(layer, "resid_pre")
                handles.append(layers[layer].register_forward_pre_hook(
                    lambda _m, args, kwargs, spec=spec: record(spec, _hidden_states_in(args, kwargs)),
                    with_kwargs=True))
            if HookSpec(layer, "resid_post") in wanted:
                spec = HookSpec(layer, "resid_post")
                handles.append(layers[layer].register_forward_hook(
                    lambda _m, _args, output, spec=spec: record(spec, _hidden_states_out(output))))
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
            f"model {_model_name(model)!r} never ran the hooked layers for "
            f"{sorted(h.label for h in missing)}: its forward does not call its decoder layers as "
            "modules, so mdiff cannot hook it"
        )
    return {h: captured[h] for h in hooks}


# ----------------------------------------------------------------------------------------------
# Devices and dtypes
# ----------------------------------------------------------------------------------------------


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


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"compute dtype {dtype!r} must be resolved first (float32 or bfloat16): it is part of the "
            "cache key, and 'auto' means different things on CPU and GPU; use resolve_dtype()"
        )
    return name


def _dtype_kwarg() -> str:
    """transformers renamed `torch_dtype` to `dtype` in 4.56 and warns about the old name."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def _offline() -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE once at import, so setting it later is ignored."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache_dir(cache_dir: str | os.PathLike | None) -> str | None:
    """Like `_offline`, honour HF_HUB_CACHE / HF_HOME as they are now, not as they were at import."""
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _source_kind(spec: ModelSpec) -> str:
    given = [k for k in ("repo", "path", "gguf") if getattr(spec, k)]
    if len(given) != 1:
        raise ValueError(
            f"model {spec.name!r}: set exactly one of repo, path, gguf (got {given or 'none'})"
        )
    if spec.revision and given[0] != "repo":
        raise ValueError(f"model {spec.name!r}: revision is only meaningful with repo, not {given[0]}")
    return given[0]


def _where(spec: ModelSpec) -> str:
    if spec.repo:
        return f"repo {spec.repo!r} revision {spec.revision or 'main'!r}"
    return f"path {spec.path!r}" if spec.path else f"GGUF file {spec.gguf!r}"


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text[:limit] + "..." if len(text) > limit else text.rstrip(".")
    return f"{type(exc).__name__}: {text}"


def _cache_root(cache_dir: str | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE)


def _cached_revisions(repo: str, cache_dir: str | None) -> list[str] | None:
    """Revisions this repo has in the local hub cache; None when the repo is not cached at all."""
    repo_dir = _cache_root(cache_dir) / f"models--{repo.replace('/', '--')}"
    if not repo_dir.is_dir():
        return None
    refs = repo_dir / "refs"
    return sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []


def _hub_hint(spec: ModelSpec, exc: BaseException, cache_dir: str | None) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = spec.revision or "main"
    download = f"download it first (`hf download {spec.repo} --revision {revision}`) or set HF_HUB_OFFLINE=0"
    if isinstance(exc, RevisionNotFoundError):
        return "check the revision name; Pythia revisions look like step143000"
    if isinstance(exc, GatedRepoError):
        return "accept the model's licence on huggingface.co and log in with `hf auth login`"
    if isinstance(exc, RepositoryNotFoundError):
        return "check the repo id (owner/name); private repos need `hf auth login`"
    if isinstance(exc, LocalEntryNotFoundError) or _offline():
        cached = _cached_revisions(spec.repo, cache_dir)
        if cached is None:
            return f"{spec.repo} is not in the local hub cache ({_cache_root(cache_dir)}); {download}"
        if revision not in cached:
            return (f"revision {revision!r} is not in the local cache of {spec.repo} (cached: "
                    f"{', '.join(cached) or 'none'}); check the revision name (Pythia revisions look "
                    f"like step143000), or {download}")
        return f"the cached snapshot of {spec.repo}@{revision} is incomplete; {download}"
    return "check the repo id and revision, and your network connection"


def _fix_hint(spec: ModelSpec, exc: BaseException, cache_dir: str | None) -> str:
    if spec.repo:
        return _hub_hint(spec, exc, cache_dir)
    target = spec.path or spec.gguf
    if not Path(target).exists():
        return f"check the path: {target} does not exist"
    if spec.path:
        return "`path` must be a Hugging Face model directory (config.json plus *.safetensors or *.bin)"
    return "`gguf` must be a complete GGUF file of an architecture transformers can dequantize"


def _load_error(spec: ModelSpec, what: str, exc: BaseException,
                cache_dir: str | None = None) -> ModelLoadError:
    return ModelLoadError(
        f"could not load the {what} of model {spec.name!r} from {_where(spec)}: {_one_line(exc)}. "
        f"Fix: {_fix_hint(spec, exc, cache_dir)}"
    )


def _resolve_commit(spec: ModelSpec, cache_dir: str | None) -> str:
    """The commit a hub revision points to now; offline, the one the local cache recorded for it."""
    from huggingface_hub import hf_hub_download

    try:
        config_file = hf_hub_download(spec.repo, "config.json", revision=spec.revision or "main",
                                      cache_dir=cache_dir, local_files_only=_offline())
    except Exception as e:  # noqa: BLE001 - every cause becomes one clear ModelLoadError
        raise _load_error(spec, "config", e, cache_dir) from e
    match = _COMMIT_RE.search(Path(config_file).as_posix())
    if match is None:
        raise ModelLoadError(
            f"model {spec.name!r}: {_where(spec)} resolved to {config_file}, which is not inside a "
            "hub cache snapshot, so its commit is unknown. Fix: use `path` for local directories"
        )
    return match.group(1)


def _locate(spec: ModelSpec, cache_dir: str | None) -> tuple[str, dict, str | None]:
    """(name_or_path, from_pretrained kwargs, commit) for this source.

    Hub sources are pinned to the commit their revision resolves to, so that the config, the weights
    and the tokenizer come from one snapshot, the one the identity names.
    """
    kind = _source_kind(spec)
    if kind == "repo":
        commit = _resolve_commit(spec, cache_dir)
        return spec.repo, dict(revision=commit, cache_dir=cache_dir, local_files_only=_offline()), commit
    target = Path(spec.path or spec.gguf)
    if not target.exists():
        raise _load_error(spec, "files", FileNotFoundError(f"no such {kind}: {target}"))
    if kind == "path":
        return str(target), {}, None
    return str(target.parent), dict(gguf_file=target.name), None


def _from_pretrained(spec: ModelSpec, what: str, loader, name_or_path: str, kwargs: dict,
                     cache_dir: str | None):
    """Every failure inside transformers becomes one ModelLoadError that says what to do."""
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _load_error(spec, what, e, cache_dir) from e


# ----------------------------------------------------------------------------------------------
# Identity
# ----------------------------------------------------------------------------------------------


def _sha256_files(files: list[tuple[str, Path]]) -> str:
    """Names and lengths are framed into the hash so that moving bytes between files changes it."""
    h = hashlib.sha256()
    for rel, path in files:
        h.update(rel.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
    return h.hexdigest()


def _weight_files(directory: Path) -> list[tuple[str, Path]]:
    found = {p.name: p for pattern in _HASHED_PATTERNS for p in directory.glob(pattern) if p.is_file()}
    return sorted(found.items())


def _source_identity(spec: ModelSpec, cache_dir: str | None, commit: str | None) -> dict:
    kind = _source_kind(spec)
    if kind == "repo":
        return {"source": "hub", "repo": spec.repo, "revision": spec.revision or "main",
                "commit": commit or _resolve_commit(spec, cache_dir)}
    target = Path(spec.path or spec.gguf)
    if kind == "path":
        files = _weight_files(target) if target.is_dir() else []
        if not any(rel != "config.json" for rel, _ in files):
            raise _load_error(spec, "weights", FileNotFoundError(f"no *.safetensors or *.bin in {target}"))
        return {"source": "dir", "name": target.name, "weights_sha256": _sha256_files(files)}
    if not target.is_file():
        raise _load_error(spec, "weights", FileNotFoundError(str(target)))
    return {"source": "gguf", "name": target.name, "weights_sha256": _sha256_files([("", target)])}


def model_identity(spec: ModelSpec, compute_dtype: str | torch.dtype,
                   cache_dir: str | os.PathLike | None = None) -> dict:
    """What determines the activations, and nothing else: a moved directory keeps its cache.

    Reads no weights into memory (local files are hashed, hub revisions resolved to a commit).
    """
    dtype = _dtype_name(compute_dtype)  # before hashing: a bad dtype should not cost a 10 GB read
    return {**_source_identity(spec, _hub_cache_dir(cache_dir), None), "dtype": dtype}


def model_key(identity: dict) -> str:
    """Readable prefix for humans browsing the store, hash suffix for uniqueness."""
    if identity.get("source") == "hub":
        slug = f"{identity['repo'].replace('/', '--')}@{identity['revision']}"
    else:
        slug = str(identity.get("name", "model"))
    slug = _KEY_CHARS.sub("-", slug).lstrip(".-")[:_KEY_SLUG_MAX].rstrip(".-") or "model"
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode())
    return f"{slug}-{digest.hexdigest()[:10]}"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


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
    cache = _hub_cache_dir(cache_dir)
    name_or_path, kwargs, commit = _locate(spec, cache)
    config = _from_pretrained(spec, "config", AutoConfig, name_or_path, kwargs, cache)
    architecture = check_architecture(getattr(config, "model_type", None), spec.name)
    identity = {**_source_identity(spec, cache, commit), "dtype": _dtype_name(dtype)}
    model = _from_pretrained(spec, "weights", AutoModelForCausalLM, name_or_path,
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

    cache = _hub_cache_dir(cache_dir)
    name_or_path, kwargs, _ = _locate(spec, cache)
    config = _from_pretrained(spec, "config", AutoConfig, name_or_path, kwargs, cache)
    check_architecture(getattr(config, "model_type", None), spec.name)
    n_layers = int(config.num_hidden_layers)
    for hook in hooks:
        if not 0 <= hook.layer < n_layers:
            raise ValueError(
                f"hook {hook.label}: model {spec.name!r} ({_where(spec)}) has {n_layers} layers, so "
                f"[[hooks]] layer must be in 0..{n_layers - 1}, got layer {hook.layer}"
            )
    return config


def load_tokenizer(spec: ModelSpec, cache_dir: str | os.PathLike | None = None):
    """The model's own tokenizer, from the same source (and snapshot) as its weights."""
    from transformers import AutoTokenizer

    cache = _hub_cache_dir(cache_dir)
    name_or_path, kwargs, _ = _locate(spec, cache)
    return _from_pretrained(spec, "tokenizer", AutoTokenizer, name_or_path, kwargs, cache)


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def _special_ids(tokenizer) -> dict:
    return {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}


def _backend_state(tokenizer) -> object:
    """What decides the ids of a plain text: vocabulary, added tokens, normalization,
    pre-tokenization, model and post-processing.

    Padding/truncation settings are dropped: transformers sets them on the backend as a side effect
    of calls with padding=True, and they do not change which ids a text becomes.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}
    state = json.loads(backend.to_str())
    state.pop("padding", None)
    state.pop("truncation", None)
    return state


def _sha256_json(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Equal fingerprints mean equal token ids for every text, chat and padded batch: what a token
    set built with this tokenizer depends on."""
    return _sha256_json({"tokenizer": _backend_state(tokenizer), "special_ids": _special_ids(tokenizer),
                         "chat_template": getattr(tokenizer, "chat_template", None)})


def vocabulary_fingerprint(tokenizer) -> str:
    """Equal fingerprints mean every id names the same token and every plain text becomes the same
    ids. Which ids are called eos/pad and the chat template are left out: a token set is built
    with one tokenizer and its ids are fed to every model, so those may differ between models
    (a base model and its chat version usually name different end-of-text tokens)."""
    return _sha256_json(_backend_state(tokenizer))


def _difference_hint(a, b) -> str:
    """Only computed on the error path, so a full vocabulary scan is affordable."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        ia = {i: t for t, i in va.items()}
        ib = {i: t for t, i in vb.items()}
        first = next((i for i in sorted(ia.keys() | ib.keys()) if ia.get(i) != ib.get(i)), None)
        return (f"vocab sizes {len(va)} vs {len(vb)}; first differing token id {first}: "
                f"{ia.get(first)!r} vs {ib.get(first)!r}")
    if _special_ids(a) != _special_ids(b):
        return f"same vocabulary, different special tokens: {_special_ids(a)} vs {_special_ids(b)}"
    if getattr(a, "chat_template", None) != getattr(b, "chat_template", None):
        return "same vocabulary, different chat templates"
    return "same vocabulary, different normalization, pre-tokenization or post-processing"


def check_same_tokenizer(named: list[tuple[str, Any]]) -> list[str]:
    """Model diffing compares activations position by position, which needs identical token ids:
    a different vocabulary is refused. Differences only in special-token roles or chat template are
    returned as notes (the token set is built with one of the tokenizers; `tokens.tokenizer`)."""
    if len(named) < 2:
        return []
    first_name, first_tok = named[0]
    reference, vocabulary = tokenizer_fingerprint(first_tok), vocabulary_fingerprint(first_tok)
    notes = []
    for name, tok in named[1:]:
        if tokenizer_fingerprint(tok) == reference:
            continue
        if vocabulary_fingerprint(tok) != vocabulary:
            raise TokenizerMismatchError(
                f"models {first_name!r} and {name!r} have different tokenizers "
                f"({_difference_hint(first_tok, tok)}); all models of an experiment must share a "
                "tokenizer, so compare checkpoints of one model family"
            )
        notes.append(f"models {first_name!r} and {name!r} share a vocabulary but not everything else "
                     f"({_difference_hint(first_tok, tok)}); the token set is built with one tokenizer "
                     "(tokens.tokenizer, default the first model's) and both models read its ids")
    return notes
