"""Where everything lives under a store root: the one place that spells out store paths.

storage_layout.md is the contract; this module is its code. Every other module, in this package
or outside it, asks here for a token set's folder, an array's folder, its completion records or
the file of one of its shards, so the layout can be read (and changed) in one place:

    <root>/mdiff.json                                      format marker
    <root>/tokensets/<tokenset_id>/                        Zarr group: tokens, source
    <root>/activations/<tokenset_id>/<model_key>/<hook>/   Zarr array [n_tokens, d_model]
        c/<shard>/0           one shard file per shard_rows rows
        _done/<shard>.json    written after shard <shard> is durably in place (checksums)
        _complete.json        written once every shard is recorded

Store paths also arrive from configs and from a dictionary's config.json, so every path is
checked to stay inside the root, and every format version read is checked to be one this code
knows.
"""

from __future__ import annotations

import re

from pipeline.store.errors import StoreError, StoreFormatError
from pipeline.tokens.naming import TOKEN_SET_FORMAT  # the rules a token set's rows follow (its format)

FORMAT = "mdiff-store"
FORMAT_VERSION = 1
FORMAT_MARKER = "mdiff.json"  # {"format": FORMAT, "version": FORMAT_VERSION} at the root
TOKEN_SETS = "tokensets"
ACTIVATIONS = "activations"
_COMPLETE = "_complete.json"
_SHARD_RECORDS = "_done"
_ARRAY_METADATA = "zarr.json"
_CHUNKS = "c"
_PARTIAL = ".partial"  # zarr writes a shard file to a temporary name containing this, then renames

_KEY_PART = re.compile(r"[A-Za-z0-9@+_.-]+")


def check_key(key: str) -> str:
    """Refuse a store path that could leave the root: every part a plain name, never '.' or '..'.

    Paths reach the store from configs and from a dictionary's config.json (its `arrays`); a
    crafted one must not read or write outside the root.
    """
    parts = key.split("/") if key else []
    bad = [p for p in parts if not _KEY_PART.fullmatch(p) or set(p) == {"."}]
    if bad or key.startswith("/"):
        raise StoreError(
            f"refusing the store path {key!r}: {bad[0] if bad else key!r} is not a plain name, so "
            "the path could leave the store root. Store paths are made of letters, digits and "
            "'@+_.-' (see storage_layout.md); fix the config or config.json that names it."
        )
    return key


def check_format_version(meta: dict, where: str) -> None:
    version = meta.get("version", meta.get("format_version"))
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreFormatError(
            f"{where} was written by store format {version!r}, but this mdiff reads format "
            f"{FORMAT_VERSION} and older: upgrade mdiff (pip install -U mdiff) to read it."
        )


def check_token_set_format(attrs: dict, where: str, rebuild: str) -> None:
    """Refuse a token set whose rows follow other rules than this code's.

    A token set of an older format has the same sequences in another order, so its validation
    split is other tokens; rows of the two must never be mixed (arrays cached on it are in its
    order). Imported token sets keep the foreign cache's order, which no packing rule changes.
    """
    version = attrs.get("tokenset_format")
    if version is None and "imported_from" in attrs:
        return
    if version is None:
        version = 1  # written before the format was recorded
    if not isinstance(version, int) or isinstance(version, bool) or version > TOKEN_SET_FORMAT:
        raise StoreFormatError(
            f"{where} was written by token-set format {version!r}, but this mdiff reads token-set "
            f"format {TOKEN_SET_FORMAT}: upgrade mdiff (pip install -U mdiff) to read it."
        )
    if version < TOKEN_SET_FORMAT:
        raise StoreFormatError(
            f"{where} was packed by an older mdiff (token-set format {version}): within each source "
            f"its sequences are in stream order, so its validation split is the tail of every source. "
            f"This mdiff reads token-set format {TOKEN_SET_FORMAT}, which shuffles the sequences within "
            f"each source too, and refuses to mix the two. {rebuild}"
        )


def tokenset_path(tokenset_id: str) -> str:
    return check_key(f"{TOKEN_SETS}/{tokenset_id}")


def token_set_arrays_path(tokenset_id: str) -> str:
    """The folder holding one folder per model key of the arrays cached on this token set."""
    return f"{ACTIVATIONS}/{tokenset_id}"


def activation_path(tokenset_id: str, model_key: str, hook_label: str) -> str:
    return check_key(f"{ACTIVATIONS}/{tokenset_id}/{model_key}/{hook_label}")


def complete_record(path: str) -> str:
    """The record whose existence makes the token set or array at `path` complete."""
    return f"{path}/{_COMPLETE}"


def array_metadata(path: str) -> str:
    """Zarr's metadata of the array at `path` (shape, codecs, and our attributes)."""
    return f"{path}/{_ARRAY_METADATA}"


def shard_records(path: str) -> str:
    """The folder of the array's per-shard completion records."""
    return f"{path}/{_SHARD_RECORDS}"


def shard_record(path: str, shard: int) -> str:
    return f"{path}/{_SHARD_RECORDS}/{shard:08d}.json"


def shard_record_number(name: str) -> int | None:
    """The shard a file name in shard_records() records (None for anything else)."""
    return int(name[:-5]) if name.endswith(".json") and name[:-5].isdigit() else None


def chunks_path(path: str) -> str:
    """The folder of the array's shard files."""
    return f"{path}/{_CHUNKS}"


def shard_file(path: str, metadata, shard: int) -> str:
    """The file of one shard of the array at `path` (`metadata`: the array's zarr metadata)."""
    return f"{path}/{metadata.encode_chunk_key((shard, 0))}"


def has_standard_chunk_keys(metadata) -> bool:
    """Whether the array names its shard files c/<shard>/0, as storage_layout.md says."""
    return metadata.encode_chunk_key((1, 0)) == f"{_CHUNKS}/1/0"


def is_partial_file(name: str) -> bool:
    """Whether a file name under chunks_path() is a temporary shard file (a killed writer's)."""
    return _PARTIAL in name
