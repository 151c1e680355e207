"""The experiment config: typed dataclasses, the single source of truth for every knob.

One TOML or YAML file per experiment. It is validated completely before any work starts, so a
typo found after an hour of forward passes is impossible: unknown keys, wrong types, bad values
and missing files are all reported at once, each naming the key, the file and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import math
import os
import re
import reprlib
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

Site = Literal["resid_pre", "resid_post"]
ComputeDtype = Literal["auto", "float32", "bfloat16"]
StorageDtype = Literal["bfloat16", "float32"]
SourceKind = Literal["hf", "text", "jsonl", "parquet", "tokenized"]


@dataclass(frozen=True)
class ModelSpec:
    """One checkpoint. Exactly one of `repo`, `path`, `gguf` names where its weights come from."""

    name: str
    repo: str | None = None  # Hugging Face repo id, e.g. "EleutherAI/pythia-1b"
    revision: str | None = None  # branch, tag or commit, e.g. "step512"; only with `repo`
    path: str | None = None  # local Hugging Face directory (config.json + weights)
    gguf: str | None = None  # local GGUF file; dequantized to dense weights on load
    dtype: ComputeDtype = "auto"  # compute dtype; auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto = this process's GPU if any


@dataclass(frozen=True)
class HookSpec:
    layer: int
    site: Site = "resid_post"

    @property
    def label(self) -> str:
        return f"layer{self.layer}.{self.site}"


@dataclass(frozen=True)
class SourceSpec:
    """One token source; several are mixed in proportion to `weight`."""

    kind: SourceKind
    name: str | None = None  # hf: dataset name or local dataset directory
    config: str | None = None  # hf: dataset config (subset)
    split: str = "train"  # hf / tokenized (saved dataset dict)
    revision: str | None = None  # hf: dataset revision
    paths: list[str] = field(default_factory=list)  # text / jsonl / parquet / tokenized: files or globs
    column: str | None = None  # default "text" (or "messages" for chats, "input_ids" for tokenized)
    weight: float = 1.0
    chat: Literal["auto", "yes", "no"] = "auto"  # render conversation records with the chat template
    text_unit: Literal["line", "paragraph", "file"] = "paragraph"  # text: what one document is


@dataclass(frozen=True)
class TokenSpec:
    sources: list[SourceSpec]
    context_length: int = 1024
    n_tokens: int = 1_000_000
    validation_fraction: float = 0.05
    seed: int = 0
    tokenizer: str | None = None  # name of the model whose tokenizer is used; default: the first


@dataclass(frozen=True)
class CacheSpec:
    storage_dtype: StorageDtype = "bfloat16"
    chunk_tokens: int = 4096  # rows per chunk: the unit the loader reads
    shard_tokens: int = 65536  # rows per shard file: the unit the job writes and records
    compression: Literal["none", "zstd"] = "none"
    batch_size: int = 8  # sequences per forward pass
    scale_sample_tokens: int = 65536  # tokens used to estimate each normalization scale


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    store: str  # local directory or any fsspec URL (s3://bucket/prefix, memory://x, ...)
    models: list[ModelSpec]
    hooks: list[HookSpec]
    tokens: TokenSpec
    cache: CacheSpec = field(default_factory=CacheSpec)
    storage_options: dict = field(default_factory=dict)  # passed to fsspec for remote stores
    # set by the loader: where this config came from; never read from the file itself
    source_file: str | None = field(default=None, metadata={"loader_only": True})

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """Every problem in one config, one per line, so a run is fixed in one edit instead of many.

    `problems` holds the lines without the file prefix; `str(err)` prefixes each with the file.
    """

    def __init__(self, source: str, problems: list[str] | tuple[str, ...]):
        # Both go into args so the error survives pickling (e.g. across worker processes).
        super().__init__(source, tuple(problems))
        self.source = source
        self.problems = tuple(problems)

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {p}" for p in self.problems)


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlevel = 2
_SHOW.maxlist = _SHOW.maxdict = 4


def _show(value: Any) -> str:
    """A bounded repr, in config spelling for null and booleans.

    Bounded because YAML aliases can build self-referential or exponentially shared values.
    """
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return _SHOW.repr(value)


def _show_path(path: str) -> str:
    """A path in full (truncating would hide the mistake), quoted only if it holds control chars."""
    return path if path.isprintable() else repr(path)


def _problem(errors: list[str], where: str, what: str, fix: str) -> None:
    errors.append(f"{where or '(top level)'}: {what} ({fix})")


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,60}")


def _join(where: str, key: Any) -> str:
    shown = key if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) else _show(key)
    return f"{where}.{shown}" if where else shown


# --------------------------------------------------------------------------------------------------
# Generic conversion: mapping -> typed frozen dataclass, driven by the type hints
# --------------------------------------------------------------------------------------------------

Check = Callable[[dict, str, list], None]
"""A semantic check for one dataclass: `check(values, where, errors)`.

`values` holds the fields that converted cleanly (defaults filled in); a field with a type error is
absent, so a check never reports a consequence of a problem already reported. A check may replace
values in place to normalize them (e.g. make a path absolute) before the instance is built.
"""


@dataclass(frozen=True)
class Rules:
    """What type hints cannot say: per-class semantic checks, and advice for known-bad values.

    Kept apart from the converter so later config sections (train, eval) reuse it unchanged.
    """

    checks: Mapping[type, Check] = field(default_factory=dict)
    advice: Mapping[str, str] = field(default_factory=dict)  # lowercased bad value -> hint


class _Invalid:
    """Marks a value that failed conversion; None cannot, since None is a legal optional value."""

    def __repr__(self) -> str:
        return "<invalid>"


_INVALID = _Invalid()
_NONE = type(None)
_MAX_INT = 2**63  # sizes end up in numpy / zarr shapes; anything larger is a typo


def from_mapping(cls: type, data: Any, where: str, errors: list[str], rules: Rules | None = None):
    """Build dataclass `cls` from plain parsed data, appending every problem to `errors`.

    Returns the instance, or None when the data cannot make one. It never stops at the first
    problem: the point is to report everything wrong in one pass.
    """
    out = _convert(cls, data, where, errors, rules or Rules())
    return None if out is _INVALID else out


def _convert(tp: Any, value: Any, where: str, errors: list[str], rules: Rules) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where, errors, rules)
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return _convert_union(tp, value, where, errors, rules)
    if origin is Literal:
        return _convert_literal(tp, value, where, errors, rules)
    if tp is list or origin is list:
        return _convert_list(tp, value, where, errors, rules)
    if tp is dict or origin is dict:
        return _convert_dict(tp, value, where, errors, rules)
    if tp is Any or tp is object:
        return value
    if tp in _SCALARS:
        return _SCALARS[tp](value, where, errors)
    raise TypeError(f"from_mapping cannot convert to {tp!r} (at {where}); extend the converter")


def _loader_only(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("loader_only"))


def _convert_dataclass(cls: type, data: Any, where: str, errors: list[str], rules: Rules) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls) if f.init and not _loader_only(f)}
    if not isinstance(data, Mapping):
        _problem(errors, where, f"expected a table, got {_kind(data)} {_show(data)}",
                 f"write a table with keys {', '.join(known)}")
        return _INVALID
    hints = get_type_hints(cls, vars(sys.modules[cls.__module__]))
    _report_unknown_keys(cls, data, known, where, errors)
    values: dict[str, Any] = {}
    ok = True
    for name, f in known.items():
        key_where = _join(where, name)
        if name in data:
            v = _convert(hints[name], data[name], key_where, errors, rules)
            if v is _INVALID:
                ok = False
            else:
                values[name] = v
        elif f.default is not dataclasses.MISSING:
            values[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[name] = f.default_factory()
        else:
            ok = False
            _problem(errors, key_where, "required key is missing", f"add it: {_describe(hints[name])}")
    check = rules.checks.get(cls)
    if check is not None:
        check(values, where, errors)
    if not ok:
        return _INVALID
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # a later dataclass may validate in __post_init__
        _problem(errors, where, str(e), "fix the values above")
        return _INVALID


def _report_unknown_keys(cls: type, data: Mapping, known: dict, where: str, errors: list[str]) -> None:
    hidden = {f.name for f in dataclasses.fields(cls) if _loader_only(f)}
    valid = list(known)
    for key in data:
        if not isinstance(key, str):
            _problem(errors, where, f"key {_show(key)} is not a string",
                     f"quote it; valid keys here: {', '.join(valid)}")
        elif key in hidden:
            _problem(errors, _join(where, key), "is set by the loader, not by the config file", "remove it")
        elif key not in known:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            _problem(errors, _join(where, key), "unknown key", f"{hint}valid keys here: {', '.join(valid)}")


def _convert_union(tp: Any, value: Any, where: str, errors: list[str], rules: Rules) -> Any:
    args = get_args(tp)
    if value is None:
        if _NONE in args:
            return None
        _problem(errors, where, "is null", f"give {_describe(tp)}")
        return _INVALID
    options = [a for a in args if a is not _NONE]
    if len(options) == 1:
        return _convert(options[0], value, where, errors, rules)
    for option in options:  # first alternative that converts wins, with its semantic problems
        scratch: list[str] = []
        out = _convert(option, value, where, scratch, rules)
        if out is not _INVALID:
            errors.extend(scratch)
            return out
    _problem(errors, where, f"expected {_describe(tp)}, got {_kind(value)} {_show(value)}",
             f"give {_describe(tp)}")
    return _INVALID


def _convert_literal(tp: Any, value: Any, where: str, errors: list[str], rules: Rules) -> Any:
    allowed = get_args(tp)
    if any(type(value) is type(a) and value == a for a in allowed):
        return value
    _problem(errors, where, f"{_show(value)} is not one of {', '.join(repr(a) for a in allowed)}",
             _literal_fix(value, allowed, rules))
    return _INVALID


def _literal_fix(value: Any, allowed: tuple, rules: Rules) -> str:
    if isinstance(value, str) and value.lower() in rules.advice:
        return rules.advice[value.lower()]
    if isinstance(value, bool) and any(isinstance(a, str) for a in allowed):
        return "YAML reads bare yes/no/on/off/true/false as booleans; quote the value"
    strings = [a for a in allowed if isinstance(a, str)]
    if isinstance(value, str):
        close = difflib.get_close_matches(value, strings, n=1) or difflib.get_close_matches(
            value.lower(), strings, n=1)
        if close:
            return f"did you mean '{close[0]}'?"
    return "use one of the values listed"


def _convert_list(tp: Any, value: Any, where: str, errors: list[str], rules: Rules) -> Any:
    args = get_args(tp)
    item_tp = args[0] if args else Any
    if not isinstance(value, (list, tuple)):
        _problem(errors, where, f"expected {_describe(tp)}, got {_kind(value)} {_show(value)}",
                 _list_fix(item_tp, value, where))
        return _INVALID
    out = [_convert(item_tp, v, f"{where}[{i}]", errors, rules) for i, v in enumerate(value)]
    return _INVALID if any(o is _INVALID for o in out) else out


def _list_fix(item_tp: Any, value: Any, where: str) -> str:
    if isinstance(value, Mapping) and isinstance(item_tp, type) and dataclasses.is_dataclass(item_tp):
        return f"write [[{where}]] (double brackets) in TOML, or start each entry with '- ' in YAML"
    if isinstance(value, (str, int, float)):
        return f"wrap it in a list: [{_show(value)}]"
    return "write a list"


def _convert_dict(tp: Any, value: Any, where: str, errors: list[str], rules: Rules) -> Any:
    if not isinstance(value, Mapping):
        _problem(errors, where, f"expected a table, got {_kind(value)} {_show(value)}",
                 "write a table (key = value pairs)")
        return _INVALID
    args = get_args(tp)
    if not args:
        return dict(value)
    key_tp, value_tp = args
    out = {}
    for k, v in value.items():
        ck = _convert(key_tp, k, where, errors, rules)
        cv = _convert(value_tp, v, _join(where, k), errors, rules)
        if ck is _INVALID or cv is _INVALID:
            return _INVALID
        out[ck] = cv
    return out


def _as_number(text: str) -> float | None:
    """The number a quoted string spells, to tell the user to unquote it (YAML reads 1e6 as text)."""
    try:
        x = float(text)
    except (ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def _to_str(value: Any, where: str, errors: list[str]) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        fix = "quote it: YAML reads bare yes/no/on/off/true/false as booleans"
    elif isinstance(value, (int, float)):
        fix = f"quote it: \"{value}\""
    else:
        fix = "write a single string"
    _problem(errors, where, f"expected a string, got {_kind(value)} {_show(value)}", fix)
    return _INVALID


def _to_int(value: Any, where: str, errors: list[str]) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= _MAX_INT:
            _problem(errors, where, f"{_show(value)} is out of range", "use a value below 2**63")
            return _INVALID
        return int(value)
    if isinstance(value, bool):
        fix = "booleans are not numbers here; write an integer such as 0 or 1"
    elif isinstance(value, float) and value.is_integer() and abs(value) < _MAX_INT:
        fix = f"write it without a fractional part: {int(value)}"
    elif isinstance(value, str) and (x := _as_number(value)) is not None and x.is_integer() \
            and abs(x) < _MAX_INT:
        fix = f"write {int(x)} as a bare number, without quotes"
    else:
        fix = "write a whole number"
    _problem(errors, where, f"expected an integer, got {_kind(value)} {_show(value)}", fix)
    return _INVALID


def _to_float(value: Any, where: str, errors: list[str]) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
        if math.isfinite(x):
            return x
        _problem(errors, where, f"{_show(value)} is not a finite number", "give a finite number")
        return _INVALID
    if isinstance(value, bool):
        fix = "booleans are not numbers here; write a number"
    elif isinstance(value, str) and (x := _as_number(value)) is not None:
        fix = f"write {x!r} as a bare number, without quotes"
    else:
        fix = "write a number"
    _problem(errors, where, f"expected a number, got {_kind(value)} {_show(value)}", fix)
    return _INVALID


def _to_bool(value: Any, where: str, errors: list[str]) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        fix = "write true or false without quotes"
    else:
        fix = "write true or false"
    _problem(errors, where, f"expected true or false, got {_kind(value)} {_show(value)}", fix)
    return _INVALID


_SCALARS: Mapping[type, Callable[[Any, str, list], Any]] = types.MappingProxyType(
    {str: _to_str, int: _to_int, float: _to_float, bool: _to_bool}
)


def _describe(tp: Any) -> str:
    """The expected type in the words a config author uses (tables, lists), not Python's."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a table with keys " + ", ".join(
            f.name for f in dataclasses.fields(tp) if f.init and not _loader_only(f))
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in get_args(tp) if a is not _NONE)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if tp is list or origin is list:
        args = get_args(tp)
        if args and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
            return "a list of tables"
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {plural.get(args[0], 'values')}" if args else "a list"
    if tp is dict or origin is dict:
        return "a table"
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------
# Semantic checks for the experiment schema
# --------------------------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
_LOCAL_FILE_KINDS = ("text", "jsonl", "parquet")
_RELATIVE = "relative paths are relative to the config file's directory"

# Bad literal values people actually type, with why they are refused.
_ADVICE: Mapping[str, str] = types.MappingProxyType({
    **dict.fromkeys(("float16", "fp16", "half", "f16"),
                    "float16 overflows on real residual streams; use bfloat16"),
    **dict.fromkeys(("bf16", "bfloat"), "spell it 'bfloat16'"),
    **dict.fromkeys(("fp32", "f32", "float", "single"), "spell it 'float32'"),
})


def _have(values: dict, *names: str) -> bool:
    """Whether all these fields converted, so a cross-field check can trust them."""
    return all(n in values for n in names)


def _is_url(store: str) -> bool:
    return "://" in store


def _absolute(path: str, base_dir: str) -> str:
    try:
        path = os.path.expanduser(path)
    except (ValueError, OSError):  # e.g. an embedded NUL byte; the existence check reports it
        pass
    return os.path.normpath(os.path.join(base_dir, path))


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _glob_files(pattern: str) -> list[str]:
    try:
        return sorted(m for m in glob.iglob(pattern, recursive=True) if os.path.isfile(m))
    except (OSError, ValueError):
        return []


def _check_name(value: str, where: str, errors: list[str], what: str) -> None:
    if not value:
        _problem(errors, where, "is empty", f"give the {what} a name of letters, digits, '-', '_', '.'")
    elif not _NAME.fullmatch(value):
        bad = "".join(sorted({c for c in value if not _NAME.fullmatch(c)}))
        _problem(errors, where, f"{_show(value)} contains {_show(bad)}",
                 "use only letters, digits, '-', '_' and '.': the name labels files in the store")


def _check_size(values: dict, key: str, where: str, errors: list[str], minimum: int, why: str) -> bool:
    """Whether `key` is present and at least `minimum`; negative sizes get their own message."""
    if key not in values:
        return False
    v = values[key]
    if v < 0:
        _problem(errors, _join(where, key), f"is negative ({v})", f"it is a size: {why}")
    elif v < minimum:
        _problem(errors, _join(where, key), f"is {v}", why)
    return v >= minimum


def _nearest_multiple(x: int, step: int) -> int:
    lower = x // step * step
    upper = lower + step
    return lower if lower >= step and x - lower <= upper - x else upper


def _check_model(values: dict, where: str, errors: list[str], *, base_dir: str) -> None:
    if "name" in values:
        _check_name(values["name"], _join(where, "name"), errors, "model")
    for key in ("repo", "path", "gguf", "revision"):
        if values.get(key) == "":
            _problem(errors, _join(where, key), "is empty", "remove it or give a value")
    if _have(values, "repo", "path", "gguf"):
        given = [k for k in ("repo", "path", "gguf") if values[k] is not None]
        if not given:
            _problem(errors, where, "says nowhere to load weights from",
                     "set exactly one of repo (Hugging Face id), path (local directory), gguf (.gguf file)")
        elif len(given) > 1:
            _problem(errors, where, f"sets {' and '.join(given)}", "keep exactly one of repo, path, gguf")
    if _have(values, "repo", "revision") and values["revision"] is not None and values["repo"] is None:
        _problem(errors, _join(where, "revision"), "is set without repo",
                 "revision picks a branch, tag or commit of a Hugging Face repo; remove it or set repo")
    if values.get("path"):
        values["path"] = _check_model_dir(values["path"], _join(where, "path"), errors, base_dir)
    if values.get("gguf"):
        values["gguf"] = _check_gguf(values["gguf"], _join(where, "gguf"), errors, base_dir)
    if "device" in values and not _DEVICE.fullmatch(values["device"]):
        _problem(errors, _join(where, "device"), f"{_show(values['device'])} is not a device",
                 "use auto, cpu, cuda, cuda:N or mps")


def _check_model_dir(path: str, where: str, errors: list[str], base_dir: str) -> str:
    full = _absolute(path, base_dir)
    if os.path.isfile(full):
        fix = "use gguf = ... for a .gguf file" if full.endswith(".gguf") else \
            "give the directory holding config.json and the weights"
        _problem(errors, where, f"{_show_path(full)} is a file, not a directory", fix)
    elif not os.path.isdir(full):
        _problem(errors, where, f"no such directory: {_show_path(full)}", f"check the path; {_RELATIVE}")
    return full


def _check_gguf(path: str, where: str, errors: list[str], base_dir: str) -> str:
    full = _absolute(path, base_dir)
    if not full.endswith(".gguf"):
        _problem(errors, where, f"{_show_path(full)} does not end in .gguf",
                 "gguf names a GGUF checkpoint file; use path = ... for a Hugging Face directory")
    elif not os.path.isfile(full):
        _problem(errors, where, f"no such file: {_show_path(full)}", f"check the path; {_RELATIVE}")
    return full


def _check_hook(values: dict, where: str, errors: list[str]) -> None:
    _check_size(values, "layer", where, errors, 0, "layers count from 0 at the first block")


def _check_source(values: dict, where: str, errors: list[str], *, base_dir: str) -> None:
    if "weight" in values and not values["weight"] > 0:
        _problem(errors, _join(where, "weight"), f"is {values['weight']}",
                 "weights are mixing proportions and must be > 0; remove the source instead")
    if not _have(values, "kind", "name", "paths"):
        return
    kind, name, paths = values["kind"], values["name"], values["paths"]
    if kind == "hf":
        if not name:
            _problem(errors, _join(where, "name"), "is required for kind 'hf'",
                     "give a dataset id such as 'roneneldan/TinyStories' or a local dataset directory")
        if paths:
            _problem(errors, _join(where, "paths"), "is not read by kind 'hf'",
                     "remove it, or use kind 'text', 'jsonl' or 'parquet' for local files")
    elif kind in _LOCAL_FILE_KINDS:
        if not paths:
            _problem(errors, _join(where, "paths"), f"is empty; kind '{kind}' reads local files",
                     "list files or globs, e.g. paths = ['data/*.jsonl']")
        values["paths"] = _check_files(paths, _join(where, "paths"), errors, base_dir, ())
    elif kind == "tokenized":
        _check_tokenized(values, where, errors, base_dir)


def _check_tokenized(values: dict, where: str, errors: list[str], base_dir: str) -> None:
    name, paths = values["name"], values["paths"]
    if name and paths:
        _problem(errors, where, "kind 'tokenized' sets both name and paths",
                 "keep name (a save_to_disk directory) or paths (jsonl/parquet files), not both")
    elif not name and not paths:
        _problem(errors, where, "kind 'tokenized' needs name or paths",
                 "set name to a directory written by datasets' save_to_disk, or paths to jsonl/parquet files")
    elif name:
        full = values["name"] = _absolute(name, base_dir)
        if not os.path.isdir(full):
            _problem(errors, _join(where, "name"), f"no such directory: {_show_path(full)}",
                     f"name a directory written by datasets' save_to_disk; {_RELATIVE}")
    else:
        values["paths"] = _check_files(paths, _join(where, "paths"), errors, base_dir,
                                       (".jsonl", ".parquet"))


def _check_files(paths: list[str], where: str, errors: list[str], base_dir: str,
                 suffixes: tuple[str, ...]) -> list[str]:
    """Each entry must name a file or a glob matching one; returns the entries made absolute."""
    out = []
    for i, entry in enumerate(paths):
        at = f"{where}[{i}]"
        full = _absolute(entry, base_dir)
        out.append(full)
        if not entry:
            _problem(errors, at, "is empty", "give a file path or a glob")
            continue
        if _is_glob(entry):
            files = _glob_files(full)
            if not files:
                _problem(errors, at, f"glob {_show(entry)} matches no file (looked for {_show_path(full)})",
                         f"fix the pattern; {_RELATIVE}")
        elif os.path.isdir(full):
            files = []
            _problem(errors, at, f"{_show_path(full)} is a directory",
                     f"give files, or a glob such as '{entry.rstrip('/')}/*'")
        elif not os.path.isfile(full):
            files = []
            _problem(errors, at, f"no such file: {_show_path(full)}", f"check the path; {_RELATIVE}")
        else:
            files = [full]
        wrong = [f for f in files if suffixes and not f.endswith(suffixes)]
        if wrong:
            _problem(errors, at, f"{_show_path(wrong[0])} is not a {' or '.join(suffixes)} file",
                     "kind 'tokenized' reads pre-tokenized .jsonl or .parquet files")
    return out


def _check_tokens(values: dict, where: str, errors: list[str]) -> None:
    if "sources" in values and not values["sources"]:
        _problem(errors, _join(where, "sources"), "is empty", "add at least one [[tokens.sources]] table")
    ctx_ok = _check_size(values, "context_length", where, errors, 2,
                         "a sequence needs at least 2 tokens; use e.g. 1024")
    n_ok = _check_size(values, "n_tokens", where, errors, 1, "it counts tokens to cache; use e.g. 1000000")
    _check_size(values, "seed", where, errors, 0, "use a non-negative integer")
    ctx, n = values.get("context_length"), values.get("n_tokens")
    if ctx_ok and n_ok and n < ctx:
        _problem(errors, _join(where, "n_tokens"), f"{n} is less than context_length {ctx}",
                 f"raise n_tokens to at least {ctx} (one whole sequence) or lower context_length")
    if "validation_fraction" in values:
        _check_validation(values, where, errors, ctx if ctx_ok else None, n if n_ok else None)


def _check_validation(values: dict, where: str, errors: list[str], ctx: int | None, n: int | None) -> None:
    vf = values["validation_fraction"]
    at = _join(where, "validation_fraction")
    if not 0 <= vf < 1:
        _problem(errors, at, f"is {vf}", "use a fraction in [0, 1), e.g. 0.05; 0 disables validation")
        return
    if vf == 0 or ctx is None or n is None or n < ctx:
        return
    sequences = n // ctx
    if sequences * vf < 1:
        need = math.ceil(1 / vf)
        while need * vf < 1:  # guard float rounding in 1 / vf
            need += 1
        _problem(errors, at, f"{vf} of {sequences} sequences leaves the validation split empty",
                 f"raise n_tokens to at least {need * ctx}, or set validation_fraction = 0")


def _check_cache(values: dict, where: str, errors: list[str]) -> None:
    _check_size(values, "chunk_tokens", where, errors, 1, "rows per chunk; use e.g. 4096")
    _check_size(values, "shard_tokens", where, errors, 1, "rows per shard; use e.g. 65536")
    _check_size(values, "batch_size", where, errors, 1, "sequences per forward pass; use e.g. 8")
    _check_size(values, "scale_sample_tokens", where, errors, 1, "tokens for the scale estimate; use e.g. 65536")
    # shard_tokens vs chunk_tokens is checked with the experiment, which also knows context_length
    # and so can suggest one value that satisfies both.


def _check_experiment(values: dict, where: str, errors: list[str], *, base_dir: str) -> None:
    if "name" in values:
        _check_name(values["name"], _join(where, "name"), errors, "experiment")
    _check_store(values, where, errors, base_dir)
    if "models" in values:
        _check_models(values["models"], _join(where, "models"), errors)
    if "hooks" in values:
        _check_hooks(values["hooks"], _join(where, "hooks"), errors)
    if _have(values, "models", "tokens"):
        _check_tokenizer(values["tokens"], values["models"], _join(where, "tokens.tokenizer"), errors)
    if "cache" in values:
        _check_shards(values["cache"], values.get("tokens"), _join(where, "cache"), errors)


def _check_store(values: dict, where: str, errors: list[str], base_dir: str) -> None:
    store = values.get("store")
    if store is not None and not store.strip():
        _problem(errors, _join(where, "store"), "is empty",
                 "give a local directory or an fsspec URL such as s3://bucket/prefix")
    elif store is not None and not _is_url(store):
        values["store"] = _absolute(store, base_dir)
    options = values.get("storage_options")
    if options and store and not _is_url(store):
        _problem(errors, _join(where, "storage_options"), "is set but store is a local path",
                 "storage_options configure fsspec URL stores; remove it or make store a URL")
    if options:
        why = _unrecordable(options)
        if why:
            _problem(errors, _join(where, "storage_options"), why,
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
                return f"has the non-string key {_show(bad[0])}"
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, depth + 1) for x in v)
        else:
            return f"holds {_show(v)} of type {type(v).__name__}"
    return None


def _check_models(models: list[ModelSpec], where: str, errors: list[str]) -> None:
    if not models:
        _problem(errors, where, "is empty", "add at least one [[models]] table")
    first: dict[str, int] = {}
    for i, m in enumerate(models):
        if m.name in first:
            _problem(errors, f"{where}[{i}].name", f"{_show(m.name)} is already used by {where}[{first[m.name]}]",
                     "model names must be unique; rename one")
        first.setdefault(m.name, i)


def _check_hooks(hooks: list[HookSpec], where: str, errors: list[str]) -> None:
    if not hooks:
        _problem(errors, where, "is empty", "add at least one [[hooks]] table, e.g. layer = 6")
    first: dict[tuple[int, str], int] = {}
    for i, h in enumerate(hooks):
        key = (h.layer, h.site)
        if key in first:
            _problem(errors, f"{where}[{i}]", f"repeats {where}[{first[key]}] (layer {h.layer}, {h.site})",
                     "remove the duplicate")
        first.setdefault(key, i)


def _check_tokenizer(tokens: TokenSpec, models: list[ModelSpec], where: str, errors: list[str]) -> None:
    names = [m.name for m in models]
    if tokens.tokenizer is None or tokens.tokenizer in names:
        return
    close = difflib.get_close_matches(tokens.tokenizer, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    listed = ", ".join(repr(n) for n in names) or "none are defined"
    _problem(errors, where, f"{_show(tokens.tokenizer)} is not the name of a model",
             f"{hint}it names the model whose tokenizer is used; models: {listed}")


def _check_shards(cache: CacheSpec, tokens: TokenSpec | None, where: str, errors: list[str]) -> None:
    """Shards hold whole chunks and whole sequences; suggest one size that satisfies both."""
    shard, chunk = cache.shard_tokens, cache.chunk_tokens
    ctx = tokens.context_length if tokens is not None and tokens.context_length >= 2 else None
    if shard < 1 or chunk < 1:
        return  # already reported as a bad size
    nearest = _nearest_multiple(shard, math.lcm(chunk, ctx or 1))
    at = _join(where, "shard_tokens")
    if shard % chunk:
        _problem(errors, at, f"{shard} is not a multiple of cache.chunk_tokens {chunk}",
                 f"a shard holds whole chunks; use {nearest}")
    if ctx and shard % ctx:
        _problem(errors, at, f"{shard} is not a multiple of tokens.context_length {ctx}",
                 f"the job writes whole sequences per shard; use {nearest}")
    if ctx and 1 <= cache.scale_sample_tokens < ctx:
        _problem(errors, _join(where, "scale_sample_tokens"),
                 f"{cache.scale_sample_tokens} is less than tokens.context_length {ctx}",
                 f"scales are estimated from whole sequences; use at least {ctx}")


def _experiment_rules(base_dir: str) -> Rules:
    return Rules(
        checks={
            ExperimentConfig: partial(_check_experiment, base_dir=base_dir),
            ModelSpec: partial(_check_model, base_dir=base_dir),
            SourceSpec: partial(_check_source, base_dir=base_dir),
            HookSpec: _check_hook,
            TokenSpec: _check_tokens,
            CacheSpec: _check_cache,
        },
        advice=_ADVICE,
    )


# --------------------------------------------------------------------------------------------------
# Loading and dumping
# --------------------------------------------------------------------------------------------------


def parse_config(mapping: Any, source: str = "<config>", base_dir: str | os.PathLike | None = None
                 ) -> ExperimentConfig:
    """Validate already-parsed data completely, raising one ConfigError that lists every problem.

    Relative paths are resolved against `base_dir` (default: the working directory).
    """
    base = os.path.abspath(os.fspath(base_dir) if base_dir is not None else os.getcwd())
    errors: list[str] = []
    if mapping is None:
        raise ConfigError(source, ["the config is empty (it needs name, store, models, hooks and tokens)"])
    cfg = from_mapping(ExperimentConfig, mapping, "", errors, _experiment_rules(base))
    if errors or cfg is None:
        raise ConfigError(source, errors or ["(top level): the config is invalid"])
    return cfg


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    """Read and validate a .toml or .yaml experiment file; paths in it are relative to the file."""
    source = os.fspath(path)
    data = _read(Path(source), source)
    full = os.path.abspath(source)
    cfg = parse_config(data, source, base_dir=os.path.dirname(full))
    return dataclasses.replace(cfg, source_file=full)


def _read(path: Path, source: str) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(source, [f"unsupported extension {suffix or '(none)'!r} (use .toml, .yaml or .yml)"])
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [f"no such file (looked for {os.path.abspath(source)}; check the path)"]) from None
    except IsADirectoryError:
        raise ConfigError(source, ["is a directory (name the config file inside it)"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(source, [f"is not UTF-8 text ({e.reason} at byte {e.start}; save it as UTF-8)"]) from None
    except OSError as e:
        raise ConfigError(source, [f"cannot be read: {e.strerror or e} (check its permissions)"]) from None
    return _parse_toml(text, source) if suffix == ".toml" else _parse_yaml(text, source)


def _parse_toml(text: str, source: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # its message carries "(at line L, column C)"
        raise ConfigError(source, [f"TOML syntax error: {e} (fix the syntax there)"]) from None
    except RecursionError:
        raise ConfigError(source, ["TOML syntax error: nested too deeply (flatten it)"]) from None


def _parse_yaml(text: str, source: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(" ".join(str(x) for x in (e.context, e.problem) if x).split())
        if isinstance(e, yaml.constructor.ConstructorError):  # e.g. a !!python tag, refused on purpose
            raise ConfigError(source, [f"{where}YAML error: {what} (use plain values only)"]) from None
        raise ConfigError(source, [f"{where}YAML syntax error: {what} (fix the syntax there)"]) from None
    except Exception as e:  # noqa: BLE001 - PyYAML's constructors raise ValueError, AttributeError, ...
        what = " ".join(str(e).split())
        raise ConfigError(source, [f"YAML error: {type(e).__name__}: {what} (fix the value)"]) from None


def dump_config(cfg: Any) -> dict:
    """A plain JSON-able dict that parse_config turns back into an equal config.

    Recorded next to the data it produced, so a store says exactly what made it. Loader-only
    fields (source_file) are left out, as are optional fields left at None.
    """
    return _dump(cfg)


def _dump(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if not f.init or _loader_only(f) or (value is None and f.default is None):
                continue
            out[f.name] = _dump(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [_dump(x) for x in obj]
    if isinstance(obj, Mapping):
        return {k: _dump(v) for k, v in obj.items()}
    return obj
