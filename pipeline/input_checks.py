"""Stage one's semantic checks: what the experiment reads (weights, source files, token settings)
and how it caches them. Each check appends every problem it finds, naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import math
import os
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

from pipeline.config import CHAT_TURN_TOKENS, CacheSpec, HookSpec, ModelSpec, SourceSpec, TokenSpec
from pipeline.config_checks import absolute_path, check_name, check_size, have
from pipeline.locations import is_remote, resolve_store
from pipeline.typed_config import Check, join_key, problem, show, show_path

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


_LOCAL_FILE_KINDS = ("text", "jsonl", "parquet")


_RELATIVE = "relative paths are relative to the config file's directory"


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _glob_files(pattern: str) -> list[str]:
    try:
        return sorted(m for m in glob.iglob(pattern, recursive=True) if os.path.isfile(m))
    except (OSError, ValueError):
        return []


def _nearest_multiple(x: int, step: int) -> int:
    lower = x // step * step
    upper = lower + step
    return lower if lower >= step and x - lower <= upper - x else upper


def _check_model(values: dict, where: str, errors: list[str], *, base_dir: str) -> None:
    if "name" in values:
        check_name(values["name"], join_key(where, "name"), errors, "model")
    for key in ("repo", "path", "gguf", "revision", "imported"):
        if values.get(key) == "":
            problem(errors, join_key(where, key), "is empty", "remove it or give a value")
    if have(values, "repo", "path", "gguf", "imported"):
        given = [k for k in ("repo", "path", "gguf") if values[k] is not None]
        if not given and values["imported"] is None:
            problem(errors, where, "says nowhere to load weights from",
                     "set exactly one of repo (Hugging Face id), path (local directory), gguf (.gguf file), "
                     "or imported = '<name given to mdiff import-cache>' to train on an imported cache")
        elif len(given) > 1:
            problem(errors, where, f"sets {' and '.join(given)}", "keep exactly one of repo, path, gguf")
    if have(values, "repo", "revision") and values["revision"] is not None and values["repo"] is None:
        problem(errors, join_key(where, "revision"), "is set without repo",
                 "revision picks a branch, tag or commit of a Hugging Face repo; remove it or set repo")
    if values.get("path"):
        values["path"] = _check_model_dir(values["path"], join_key(where, "path"), errors, base_dir)
    if values.get("gguf"):
        values["gguf"] = _check_gguf(values["gguf"], join_key(where, "gguf"), errors, base_dir)
    if "device" in values and not _DEVICE.fullmatch(values["device"]):
        problem(errors, join_key(where, "device"), f"{show(values['device'])} is not a device",
                 "use auto, cpu, cuda, cuda:N or mps")


def _check_model_dir(path: str, where: str, errors: list[str], base_dir: str) -> str:
    full = absolute_path(path, base_dir)
    if os.path.isfile(full):
        fix = "use gguf = ... for a .gguf file" if full.endswith(".gguf") else \
            "give the directory holding config.json and the weights"
        problem(errors, where, f"{show_path(full)} is a file, not a directory", fix)
    elif not os.path.isdir(full):
        problem(errors, where, f"no such directory: {show_path(full)}", f"check the path; {_RELATIVE}")
    return full


def _check_gguf(path: str, where: str, errors: list[str], base_dir: str) -> str:
    full = absolute_path(path, base_dir)
    if not full.endswith(".gguf"):
        problem(errors, where, f"{show_path(full)} does not end in .gguf",
                 "gguf names a GGUF checkpoint file; use path = ... for a Hugging Face directory")
    elif not os.path.isfile(full):
        problem(errors, where, f"no such file: {show_path(full)}", f"check the path; {_RELATIVE}")
    return full


def _check_hook(values: dict, where: str, errors: list[str]) -> None:
    check_size(values, "layer", where, errors, 0, "layers count from 0 at the first block")


def _check_source(values: dict, where: str, errors: list[str], *, base_dir: str) -> None:
    if "weight" in values and not values["weight"] > 0:
        problem(errors, join_key(where, "weight"), f"is {values['weight']}",
                 "weights are mixing proportions and must be > 0; remove the source instead")
    if "separator" in values and not values["separator"]:
        problem(errors, join_key(where, "separator"), "is empty",
                "use 'eos' (the tokenizer's EOS, the default), 'none', or one token such as '<|end_of_text|>'")
    if not have(values, "kind", "name", "paths"):
        return
    kind, name, paths = values["kind"], values["name"], values["paths"]
    if kind == "hf":
        if not name:
            problem(errors, join_key(where, "name"), "is required for kind 'hf'",
                     "give a dataset id such as 'roneneldan/TinyStories' or a local dataset directory")
        if paths:
            problem(errors, join_key(where, "paths"), "is not read by kind 'hf'",
                     "remove it, or use kind 'text', 'jsonl' or 'parquet' for local files")
    elif kind in _LOCAL_FILE_KINDS:
        if not paths:
            problem(errors, join_key(where, "paths"), f"is empty; kind '{kind}' reads local files",
                     "list files or globs, e.g. paths = ['data/*.jsonl']")
        values["paths"] = _check_files(paths, join_key(where, "paths"), errors, base_dir, ())
    elif kind == "tokenized":
        _check_tokenized(values, where, errors, base_dir)


def _check_tokenized(values: dict, where: str, errors: list[str], base_dir: str) -> None:
    name, paths = values["name"], values["paths"]
    if name and paths:
        problem(errors, where, "kind 'tokenized' sets both name and paths",
                 "keep name (a save_to_disk directory) or paths (jsonl/parquet files), not both")
    elif not name and not paths:
        problem(errors, where, "kind 'tokenized' needs name or paths",
                 "set name to a directory written by datasets' save_to_disk, or paths to jsonl/parquet files")
    elif name:
        full = values["name"] = absolute_path(name, base_dir)
        if not os.path.isdir(full):
            problem(errors, join_key(where, "name"), f"no such directory: {show_path(full)}",
                     f"name a directory written by datasets' save_to_disk; {_RELATIVE}")
    else:
        values["paths"] = _check_files(paths, join_key(where, "paths"), errors, base_dir,
                                       (".jsonl", ".parquet"))


def _check_files(paths: list[str], where: str, errors: list[str], base_dir: str,
                 suffixes: tuple[str, ...]) -> list[str]:
    """Each entry must name a file or a glob matching one; returns the entries made absolute."""
    out = []
    for i, entry in enumerate(paths):
        at = f"{where}[{i}]"
        full = absolute_path(entry, base_dir)
        out.append(full)
        if not entry:
            problem(errors, at, "is empty", "give a file path or a glob")
            continue
        if _is_glob(entry):
            files = _glob_files(full)
            if not files:
                problem(errors, at, f"glob {show(entry)} matches no file (looked for {show_path(full)})",
                         f"fix the pattern; {_RELATIVE}")
        elif os.path.isdir(full):
            files = []
            problem(errors, at, f"{show_path(full)} is a directory",
                     f"give files, or a glob such as '{entry.rstrip('/')}/*'")
        elif not os.path.isfile(full):
            files = []
            problem(errors, at, f"no such file: {show_path(full)}", f"check the path; {_RELATIVE}")
        else:
            files = [full]
        wrong = [f for f in files if suffixes and not f.endswith(suffixes)]
        if wrong:
            problem(errors, at, f"{show_path(wrong[0])} is not a {' or '.join(suffixes)} file",
                     "kind 'tokenized' reads pre-tokenized .jsonl or .parquet files")
    return out


def _check_tokens(values: dict, where: str, errors: list[str]) -> None:
    if values.get("tokenset") is not None:
        _check_named_token_set(values, where, errors)
        return
    if "sources" in values and not values["sources"]:
        problem(errors, join_key(where, "sources"), "is empty",
                "add at least one [[tokens.sources]] table, or set tokens.tokenset = 'ts-...' to use a "
                "token set already in the store")
    ctx_ok = check_size(values, "context_length", where, errors, 2,
                         "a sequence needs at least 2 tokens; use e.g. 1024")
    n_ok = check_size(values, "n_tokens", where, errors, 1, "it counts tokens to cache; use e.g. 1000000")
    check_size(values, "seed", where, errors, 0, "use a non-negative integer")
    ctx, n = values.get("context_length"), values.get("n_tokens")
    if ctx_ok and n_ok and n < ctx:
        problem(errors, join_key(where, "n_tokens"), f"{n} is less than context_length {ctx}",
                 f"raise n_tokens to at least {ctx} (one whole sequence) or lower context_length")
    if "validation_fraction" in values:
        _check_validation(values, where, errors, ctx if ctx_ok else None, n if n_ok else None)


_TOKENSET_ID = re.compile(r"ts-[0-9a-f]{16}")


_FIXED_BY_TOKEN_SET = ("context_length", "n_tokens", "validation_fraction", "seed")


def _check_named_token_set(values: dict, where: str, errors: list[str]) -> None:
    """A named token set is used as it is: nothing may describe how to build one."""
    ts = values["tokenset"]
    if not _TOKENSET_ID.fullmatch(ts):
        problem(errors, join_key(where, "tokenset"), f"{show(ts)} is not a token set id",
                "give 'ts-' and 16 hex digits, as mdiff import-cache and mdiff status print it")
    if values.get("sources"):
        problem(errors, join_key(where, "sources"), "is set together with tokens.tokenset",
                "keep one: tokenset uses a token set already in the store, sources build one; "
                "remove the [[tokens.sources]] tables or tokens.tokenset")
    defaults = {f.name: f.default for f in dataclasses.fields(TokenSpec)}
    for key in _FIXED_BY_TOKEN_SET:
        if key in values and values[key] != defaults[key]:
            problem(errors, join_key(where, key), "is set together with tokens.tokenset",
                    f"remove it: token set {ts} has its own sizes, seed and validation split")


def _check_validation(values: dict, where: str, errors: list[str], ctx: int | None, n: int | None) -> None:
    vf = values["validation_fraction"]
    at = join_key(where, "validation_fraction")
    if not 0 <= vf < 1:
        problem(errors, at, f"is {vf}", "use a fraction in [0, 1), e.g. 0.05; 0 disables validation")
        return
    if vf == 0 or ctx is None or n is None or n < ctx:
        return
    sequences = n // ctx
    if sequences * vf < 1:
        need = math.ceil(1 / vf)
        while need * vf < 1:  # guard float rounding in 1 / vf
            need += 1
        problem(errors, at, f"{vf} of {sequences} sequences leaves the validation split empty",
                 f"raise n_tokens to at least {need * ctx}, or set validation_fraction = 0")


def _check_cache(values: dict, where: str, errors: list[str]) -> None:
    check_size(values, "chunk_tokens", where, errors, 1, "rows per chunk; use e.g. 4096")
    check_size(values, "shard_tokens", where, errors, 1, "rows per shard; use e.g. 65536")
    check_size(values, "batch_size", where, errors, 1, "sequences per forward pass; use e.g. 8")
    check_size(values, "scale_sample_tokens", where, errors, 1, "tokens for the scale estimate; use e.g. 65536")


def _check_store(values: dict, where: str, errors: list[str], base_dir: str) -> None:
    store = values.get("store")
    if store is not None and not store.strip():
        problem(errors, join_key(where, "store"), "is empty",
                 "give a local directory or an fsspec URL such as s3://bucket/prefix")
    elif store is not None:
        values["store"] = resolve_store(store, base_dir)
    options = values.get("storage_options")
    if options and store and not is_remote(store):
        problem(errors, join_key(where, "storage_options"), "is set but store is a local path",
                 "storage_options configure fsspec URL stores; remove it or make store a URL")
    if options:
        why = _unrecordable(options)
        if why:
            problem(errors, join_key(where, "storage_options"), why,
                     "use only strings, numbers, booleans, lists and tables: it is recorded as JSON")


def _unrecordable(value: Any) -> str | None:
    """Why `value` cannot be recorded as JSON, or None. Bounded: YAML aliases can make cycles."""
    stack, seen = [(value, 0)], 0
    while stack:
        v, depth = stack.pop()
        seen += 1
        if seen > 10_000 or depth > 32:
            return "is too large or nested too deeply (or refers to itself)"
        if v is None or isinstance(v, (bool, int, str)):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                return f"holds the non-finite number {v}"
        elif isinstance(v, Mapping):
            bad = [k for k in v if not isinstance(k, str)]
            if bad:
                return f"has the non-string key {show(bad[0])}"
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, depth + 1) for x in v)
        else:
            return f"holds {show(v)} of type {type(v).__name__}"
    return None


def _check_models(models: list[ModelSpec], where: str, errors: list[str]) -> None:
    if not models:
        problem(errors, where, "is empty", "add at least one [[models]] table")
    first: dict[str, int] = {}
    for i, m in enumerate(models):
        if m.name in first:
            problem(errors, f"{where}[{i}].name", f"{show(m.name)} is already used by {where}[{first[m.name]}]",
                     "model names must be unique; rename one")
        first.setdefault(m.name, i)


def _check_hooks(hooks: list[HookSpec], where: str, errors: list[str]) -> None:
    if not hooks:
        problem(errors, where, "is empty", "add at least one [[hooks]] table, e.g. layer = 6")
    first: dict[tuple[int, str], int] = {}
    for i, h in enumerate(hooks):
        key = (h.layer, h.site)
        if key in first:
            problem(errors, f"{where}[{i}]", f"repeats {where}[{first[key]}] (layer {h.layer}, {h.site})",
                     "remove the duplicate")
        first.setdefault(key, i)


def _check_tokenizer(tokens: TokenSpec, models: list[ModelSpec], where: str, errors: list[str]) -> None:
    names = [m.name for m in models]
    if tokens.tokenizer is None or tokens.tokenizer in names:
        return
    close = difflib.get_close_matches(tokens.tokenizer, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    listed = ", ".join(repr(n) for n in names) or "none are defined"
    problem(errors, where, f"{show(tokens.tokenizer)} is not the name of a model",
             f"{hint}it names the model whose tokenizer is used; models: {listed}")


def _check_separators(tokens: TokenSpec, models: list[ModelSpec], where: str, errors: list[str]) -> None:
    """Plain text fed to a base model must end its documents the way the base model was trained.

    Only what the config spells out is checked: a source left at 'eos' gets the tokenizer's EOS,
    which this check cannot see without loading the tokenizer.
    """
    base = [m for m in models if m.has_weights and not m.is_chat_model]
    if not base:
        return
    for i, src in enumerate(tokens.sources):
        if src.separator in CHAT_TURN_TOKENS and src.reads_plain_text:
            problem(errors, f"{where}[{i}].separator",
                    f"{show(src.separator)} is a chat template's end-of-turn token, but this source is "
                    f"plain text and the token set feeds the base model {show(base[0].name)}, which was "
                    "not trained to read it between documents",
                    "separate plain text with the base model's own end-of-text token, e.g. "
                    "separator = '<|end_of_text|>' (Llama 3), '<eos>' (Gemma), '<|endoftext|>' (Qwen, "
                    "SmolLM, Phi-3); if the records are conversations, set chat = 'yes' to render them with "
                    f"the chat template; if {show(base[0].name)} is a chat model after all, remove separator "
                    "(the tokenizer's own EOS then ends each document)")


def _check_imported(tokens: TokenSpec, models: list[ModelSpec], where: str, errors: list[str]) -> None:
    """Imported arrays live in the token set their import made, which only tokens.tokenset names."""
    for i, m in enumerate(models):
        if m.imported is not None and tokens.tokenset is None:
            problem(errors, f"{join_key(where, 'models')}[{i}].imported", "needs tokens.tokenset",
                    "set [tokens] tokenset = the token set id mdiff import-cache printed (and remove "
                    "[[tokens.sources]]): imported arrays belong to that token set")
    weightless = {m.name for m in models if not m.has_weights}
    if tokens.tokenizer in weightless:
        problem(errors, join_key(where, "tokens.tokenizer"),
                f"{show(tokens.tokenizer)} names a model without weights (imported only)",
                "name a model with repo, path or gguf, whose tokenizer can be loaded")


def _check_shards(cache: CacheSpec, tokens: TokenSpec | None, where: str, errors: list[str]) -> None:
    """Shards hold whole chunks and whole sequences; suggest one size that satisfies both."""
    shard, chunk = cache.shard_tokens, cache.chunk_tokens
    ctx = tokens.context_length if tokens is not None and tokens.context_length >= 2 else None
    if tokens is not None and tokens.tokenset is not None:
        ctx = None  # the named token set's sequences are its own; nothing is cached with them
    if shard < 1 or chunk < 1:
        return  # already reported as a bad size
    nearest = _nearest_multiple(shard, math.lcm(chunk, ctx or 1))
    at = join_key(where, "shard_tokens")
    if shard % chunk:
        problem(errors, at, f"{shard} is not a multiple of cache.chunk_tokens {chunk}",
                 f"a shard holds whole chunks; use {nearest}")
    if ctx and shard % ctx:
        problem(errors, at, f"{shard} is not a multiple of tokens.context_length {ctx}",
                 f"the job writes whole sequences per shard; use {nearest}")
    if ctx and 1 <= cache.scale_sample_tokens < ctx:
        problem(errors, join_key(where, "scale_sample_tokens"),
                 f"{cache.scale_sample_tokens} is less than tokens.context_length {ctx}",
                 f"scales are estimated from whole sequences; use at least {ctx}")


def check_cache_experiment(values: dict, where: str, errors: list[str], *, base_dir: str) -> None:
    """The cross-section checks of stage one's part of the experiment file."""
    if "name" in values:
        check_name(values["name"], join_key(where, "name"), errors, "experiment")
    _check_store(values, where, errors, base_dir)
    if "models" in values:
        _check_models(values["models"], join_key(where, "models"), errors)
    if "hooks" in values:
        _check_hooks(values["hooks"], join_key(where, "hooks"), errors)
    if have(values, "models", "tokens"):
        _check_tokenizer(values["tokens"], values["models"], join_key(where, "tokens.tokenizer"), errors)
        _check_imported(values["tokens"], values["models"], where, errors)
        _check_separators(values["tokens"], values["models"], join_key(where, "tokens.sources"), errors)
    if "cache" in values:
        _check_shards(values["cache"], values.get("tokens"), join_key(where, "cache"), errors)


def rules(base_dir: str) -> dict[type, Check]:
    """Stage one's section checks, keyed by section class; relative paths resolve against `base_dir`."""
    return {
        ModelSpec: partial(_check_model, base_dir=base_dir),
        SourceSpec: partial(_check_source, base_dir=base_dir),
        HookSpec: _check_hook,
        TokenSpec: _check_tokens,
        CacheSpec: _check_cache,
    }
