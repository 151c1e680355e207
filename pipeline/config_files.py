"""Config files on disk: TOML or YAML in, TOML out; and configs as plain data.

Reading reports syntax errors with their line and a fix, as a ConfigError. Writing goes through
one function, so every config the project writes (demo, toy study, smoke, tests) is real TOML
that the reader accepts, never a hand-formatted template.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.typed_config import ConfigError, loader_only


def read_config_file(source: str) -> Any:
    path = Path(source)
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
            if not f.init or loader_only(f) or (value is None and f.default is None):
                continue
            out[f.name] = _dump(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [_dump(x) for x in obj]
    if isinstance(obj, Mapping):
        return {k: _dump(v) for k, v in obj.items()}
    return obj


def write_config(path: str | os.PathLike, cfg: Any, header: str = "") -> Path:
    """Write a config (a dataclass or plain mapping) as TOML that `read_config_file` reads back.

    None values are left out (TOML has no null; an absent key means the default). `header` is
    written first as comment lines, e.g. to say what made the file.
    """
    import tomli_w

    data = _drop_none(dump_config(cfg) if dataclasses.is_dataclass(cfg) else cfg)
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(comment + tomli_w.dumps(data), encoding="utf-8")
    return path


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(x) for x in obj]
    return obj
