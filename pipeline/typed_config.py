"""Typed configs from plain mappings: a generic converter driven by dataclass type hints.

Every section of an experiment config (and of later stages' configs) is a frozen dataclass; this
module turns parsed TOML/YAML into them and collects every problem, each with its key path and a
fix, so that one run reports all mistakes at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

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


def show(value: Any) -> str:
    """A bounded repr, in config spelling for null and booleans.

    Bounded because YAML aliases can build self-referential or exponentially shared values.
    """
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return _SHOW.repr(value)


def show_path(path: str) -> str:
    """A path in full (truncating would hide the mistake), quoted only if it holds control chars."""
    return path if path.isprintable() else repr(path)


def problem(errors: list[str], where: str, what: str, fix: str) -> None:
    errors.append(f"{where or '(top level)'}: {what} ({fix})")


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,60}")


def join_key(where: str, key: Any) -> str:
    shown = key if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) else show(key)
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


def loader_only(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("loader_only"))


def _convert_dataclass(cls: type, data: Any, where: str, errors: list[str], rules: Rules) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls) if f.init and not loader_only(f)}
    if not isinstance(data, Mapping):
        problem(errors, where, f"expected a table, got {_kind(data)} {show(data)}",
                 f"write a table with keys {', '.join(known)}")
        return _INVALID
    hints = get_type_hints(cls)  # each base class's fields resolve in its own module
    _report_unknown_keys(cls, data, known, where, errors)
    values: dict[str, Any] = {}
    ok = True
    for name, f in known.items():
        key_where = join_key(where, name)
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
            problem(errors, key_where, "required key is missing", f"add it: {_describe(hints[name])}")
    check = rules.checks.get(cls)
    if check is not None:
        check(values, where, errors)
    if not ok:
        return _INVALID
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # a later dataclass may validate in __post_init__
        problem(errors, where, str(e), "fix the values above")
        return _INVALID


def _report_unknown_keys(cls: type, data: Mapping, known: dict, where: str, errors: list[str]) -> None:
    hidden = {f.name for f in dataclasses.fields(cls) if loader_only(f)}
    valid = list(known)
    for key in data:
        if not isinstance(key, str):
            problem(errors, where, f"key {show(key)} is not a string",
                     f"quote it; valid keys here: {', '.join(valid)}")
        elif key in hidden:
            problem(errors, join_key(where, key), "is set by the loader, not by the config file", "remove it")
        elif key not in known:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problem(errors, join_key(where, key), "unknown key", f"{hint}valid keys here: {', '.join(valid)}")


def _convert_union(tp: Any, value: Any, where: str, errors: list[str], rules: Rules) -> Any:
    args = get_args(tp)
    if value is None:
        if _NONE in args:
            return None
        problem(errors, where, "is null", f"give {_describe(tp)}")
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
    problem(errors, where, f"expected {_describe(tp)}, got {_kind(value)} {show(value)}",
             f"give {_describe(tp)}")
    return _INVALID


def _convert_literal(tp: Any, value: Any, where: str, errors: list[str], rules: Rules) -> Any:
    allowed = get_args(tp)
    if any(type(value) is type(a) and value == a for a in allowed):
        return value
    problem(errors, where, f"{show(value)} is not one of {', '.join(repr(a) for a in allowed)}",
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
        problem(errors, where, f"expected {_describe(tp)}, got {_kind(value)} {show(value)}",
                 _list_fix(item_tp, value, where))
        return _INVALID
    out = [_convert(item_tp, v, f"{where}[{i}]", errors, rules) for i, v in enumerate(value)]
    return _INVALID if any(o is _INVALID for o in out) else out


def _list_fix(item_tp: Any, value: Any, where: str) -> str:
    if isinstance(value, Mapping) and isinstance(item_tp, type) and dataclasses.is_dataclass(item_tp):
        return f"write [[{where}]] (double brackets) in TOML, or start each entry with '- ' in YAML"
    if isinstance(value, (str, int, float)):
        return f"wrap it in a list: [{show(value)}]"
    return "write a list"


def _convert_dict(tp: Any, value: Any, where: str, errors: list[str], rules: Rules) -> Any:
    if not isinstance(value, Mapping):
        problem(errors, where, f"expected a table, got {_kind(value)} {show(value)}",
                 "write a table (key = value pairs)")
        return _INVALID
    args = get_args(tp)
    if not args:
        return dict(value)
    key_tp, value_tp = args
    out = {}
    for k, v in value.items():
        ck = _convert(key_tp, k, where, errors, rules)
        cv = _convert(value_tp, v, join_key(where, k), errors, rules)
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
    problem(errors, where, f"expected a string, got {_kind(value)} {show(value)}", fix)
    return _INVALID


def _to_int(value: Any, where: str, errors: list[str]) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= _MAX_INT:
            problem(errors, where, f"{show(value)} is out of range", "use a value below 2**63")
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
    problem(errors, where, f"expected an integer, got {_kind(value)} {show(value)}", fix)
    return _INVALID


def _to_float(value: Any, where: str, errors: list[str]) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
        if math.isfinite(x):
            return x
        problem(errors, where, f"{show(value)} is not a finite number", "give a finite number")
        return _INVALID
    if isinstance(value, bool):
        fix = "booleans are not numbers here; write a number"
    elif isinstance(value, str) and (x := _as_number(value)) is not None:
        fix = f"write {x!r} as a bare number, without quotes"
    else:
        fix = "write a number"
    problem(errors, where, f"expected a number, got {_kind(value)} {show(value)}", fix)
    return _INVALID


def _to_bool(value: Any, where: str, errors: list[str]) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        fix = "write true or false without quotes"
    else:
        fix = "write true or false"
    problem(errors, where, f"expected true or false, got {_kind(value)} {show(value)}", fix)
    return _INVALID


_SCALARS: Mapping[type, Callable[[Any, str, list], Any]] = types.MappingProxyType(
    {str: _to_str, int: _to_int, float: _to_float, bool: _to_bool}
)


def _describe(tp: Any) -> str:
    """The expected type in the words a config author uses (tables, lists), not Python's."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a table with keys " + ", ".join(
            f.name for f in dataclasses.fields(tp) if f.init and not loader_only(f))
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


