"""Naming exactly what produced a model's activations: its identity and its key.

Everything downstream (the activation store, the dictionaries trained on it, the evaluations) is
keyed by `model_key(model_identity(...))`, so a cache is reused only when the same weights ran in
the same dtype, and is never confused with another checkpoint's. The identity records what
determines the activations and nothing else: a hub checkpoint is named by the commit its revision
resolves to, a local directory or GGUF file by a hash of its weight files, never by where it lies
(a moved directory keeps its cache). Keys already written into stores must stay byte for byte the
same, so the hashing below never changes.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from pipeline.checkpoints import hub_cache_dir, load_error, resolve_commit, source_kind
from pipeline.config import ModelSpec
from pipeline.records import canonical_hash

_HASHED_PATTERNS = ("*.safetensors", "*.bin", "config.json")
_BLOCK = 8 << 20  # bytes read at a time when hashing weights: bounded memory for 10 GB shards
_KEY_CHARS = re.compile(r"[^A-Za-z0-9._@-]+")
_KEY_SLUG_MAX = 60


def dtype_name(dtype: str | torch.dtype) -> str:
    """The compute dtype as the identity records it; only a resolved dtype has one."""
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"compute dtype {dtype!r} must be resolved first (float32 or bfloat16): it is part of the "
            "cache key, and 'auto' means different things on CPU and GPU; use resolve_dtype()"
        )
    return name


def _sha256_files(files: list[tuple[str, Path]]) -> str:
    """Names and lengths are framed into the hash so that moving bytes between files changes it.

    One digest over all the files (not records.sha256_file per file): the framing is part of the
    keys already in stores."""
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


def source_identity(spec: ModelSpec, cache_dir: str | None, commit: str | None) -> dict:
    """The identity without its dtype; `commit`, when the caller has resolved it already, saves a
    second lookup."""
    kind = source_kind(spec)
    if kind == "repo":
        return {"source": "hub", "repo": spec.repo, "revision": spec.revision or "main",
                "commit": commit or resolve_commit(spec, cache_dir)}
    target = Path(spec.path or spec.gguf)
    if kind == "path":
        files = _weight_files(target) if target.is_dir() else []
        if not any(rel != "config.json" for rel, _ in files):
            raise load_error(spec, "weights", FileNotFoundError(f"no *.safetensors or *.bin in {target}"))
        return {"source": "dir", "name": target.name, "weights_sha256": _sha256_files(files)}
    if not target.is_file():
        raise load_error(spec, "weights", FileNotFoundError(str(target)))
    return {"source": "gguf", "name": target.name, "weights_sha256": _sha256_files([("", target)])}


def model_identity(spec: ModelSpec, compute_dtype: str | torch.dtype,
                   cache_dir: str | os.PathLike | None = None) -> dict:
    """What determines the activations, and nothing else: a moved directory keeps its cache.

    Reads no weights into memory (local files are hashed, hub revisions resolved to a commit).
    """
    dtype = dtype_name(compute_dtype)  # before hashing: a bad dtype should not cost a 10 GB read
    return {**source_identity(spec, hub_cache_dir(cache_dir), None), "dtype": dtype}


def model_key(identity: dict) -> str:
    """Readable prefix for humans browsing the store, hash suffix for uniqueness."""
    if identity.get("source") == "hub":
        slug = f"{identity['repo'].replace('/', '--')}@{identity['revision']}"
    else:
        slug = str(identity.get("name", "model"))
    slug = _KEY_CHARS.sub("-", slug).lstrip(".-")[:_KEY_SLUG_MAX].rstrip(".-") or "model"
    return f"{slug}-{canonical_hash(identity)[:10]}"
