"""Small records on disk, written one way everywhere: canonical JSON and its hash, strict JSON,
file hashes, and atomic writes.

Ids in the store (token sets, model keys, artifacts) are hashes of canonical JSON, so two writers
that describe the same thing must serialize it byte for byte alike; and a record that a reader
takes as proof of completion must never be seen half-written. Keeping one copy of each rule here
is what keeps the ids stable and the records whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

_BLOCK = 8 << 20  # bytes hashed at a time: bounded memory for 10 GB weight shards


def canonical_json(obj: Any, *, compact: bool = True) -> str:
    """Sorted keys, ASCII only. `compact` drops the spaces after separators; the tokenizer
    fingerprint predates it and keeps Python's default separators so existing ids stay valid."""
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(obj, sort_keys=True, separators=separators, ensure_ascii=True)


def canonical_hash(obj: Any, *, compact: bool = True) -> str:
    """SHA-256 hex digest of `canonical_json(obj)`."""
    return hashlib.sha256(canonical_json(obj, compact=compact).encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def strict_json(obj: Any) -> Any:
    """`obj` with non-finite floats as null (strict JSON has no NaN) and tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a sibling temporary path (a file or a directory), then rename it
    over `path` (a directory only where `path` does not exist yet).

    A reader sees the old file or the whole new one, never a torn one; a failed write leaves
    no temporary file behind (a full disk gets its space back).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
    """Strict JSON (NaN as null), sorted keys, a final newline."""
    atomic_write_text(path, json.dumps(strict_json(obj), indent=indent, sort_keys=True) + "\n")
