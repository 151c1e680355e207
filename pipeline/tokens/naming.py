"""The token set id: a name made of everything that determines the tokens.

A cache tells whether it was built from the same tokens by comparing ids, so the id covers the
sources (local files by base name and content hash, so moving the data keeps the id and editing
it does not), the sizes, the seed, the tokenizer's fingerprint and the packing rules' version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.config import DEFAULT_SEPARATOR, TokenSpec
from pipeline.records import canonical_hash, sha256_file
from pipeline.tokens.errors import TokenSourceError, source_label
from pipeline.tokens.files import expand_paths

# The packing and order rules' version: part of the id, and recorded as a token set's
# `tokenset_format` (pipeline.store refuses others). Bump it when the rules change.
# 1: each source's sequences in stream order. 2: shuffled within each source too.
TOKEN_SET_FORMAT = 2


def _hash_dir(path: str) -> list[list[str]]:
    """[relative posix path, sha256] of every non-hidden file under `path`, sorted."""
    rows = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            full = os.path.join(root, f)
            rows.append([Path(os.path.relpath(full, path)).as_posix(), sha256_file(full)])
    return sorted(rows)


def describe_sources(spec: TokenSpec) -> list[dict]:
    """A JSON-able description of each source that determines its content.

    Local files are identified by [basename, sha256] (not their absolute path, so moving the data
    keeps the id); a local dataset directory (hf / tokenized `name`) by [relative path, sha256] of
    every non-hidden file in it, with `name` set to None. Fields that do not affect a kind are None.
    """
    out = []
    for i, src in enumerate(spec.sources):
        d: dict[str, Any] = {
            "kind": src.kind,
            "name": src.name,
            "config": src.config if src.kind == "hf" else None,
            "split": src.split if src.kind in ("hf", "tokenized") else None,
            "revision": src.revision if src.kind == "hf" else None,
            "column": src.column if src.kind != "text" else None,
            "chat": src.chat if src.kind != "tokenized" else None,
            "text_unit": src.text_unit if src.kind == "text" else None,
            "weight": float(src.weight),
        }
        if src.separator != DEFAULT_SEPARATOR:  # only when set: other sources keep their description
            d["separator"] = src.separator
        if src.kind in ("hf", "tokenized") and src.name:
            local = os.path.expanduser(src.name)
            if os.path.isdir(local):
                d["name"] = None
                d["files"] = _hash_dir(local)
                if not d["files"]:
                    raise TokenSourceError(f"{source_label(i, src)}: directory {src.name!r} holds no files")
            elif src.kind == "tokenized":
                raise TokenSourceError(
                    f"{source_label(i, src)}: name {src.name!r} is not a directory; kind 'tokenized' "
                    "reads a local save_to_disk directory (or use `paths` for jsonl/parquet files)"
                )
        if src.paths:
            d["files"] = [[os.path.basename(p), sha256_file(p)] for p in expand_paths(i, src)]
        out.append(d)
    return out


def token_set_id(spec: TokenSpec, tokenizer_fingerprint: str, descriptions: list[dict] | None = None) -> str:
    """"ts-" + 16 hex of sha256 over everything that determines the tokens.

    `descriptions` may pass `plan.source_descriptions` (= describe_sources(spec)) to avoid hashing
    the local files a second time.
    """
    payload = {
        "format": TOKEN_SET_FORMAT,
        "sources": describe_sources(spec) if descriptions is None else descriptions,
        "context_length": spec.context_length,
        "n_tokens": spec.n_tokens,
        "validation_fraction": float(spec.validation_fraction),
        "seed": spec.seed,
        "tokenizer": tokenizer_fingerprint,
    }
    return "ts-" + canonical_hash(payload, compact=True)[:16]
