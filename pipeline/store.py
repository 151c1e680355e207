"""The activation store: the only module that knows paths, keys and completion records.

Layout (see storage_layout.md, the contract with the trainer and evaluations):

    <root>/mdiff.json                                   format marker
    <root>/tokensets/<tokenset_id>/                     Zarr group: tokens, source
    <root>/activations/<tokenset_id>/<model_key>/<hook>/  Zarr array [n_tokens, d_model]
        _done/<shard>.json    written after shard <shard> is durably in place (checksums)
        _complete.json        written once every shard is recorded

Zarr itself cannot say whether a chunk was ever written (a missing chunk reads as the fill
value), so completion is recorded by us, per shard, after the write returns; readers trust those
records and nothing else.
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

FORMAT = "mdiff-store"
FORMAT_VERSION = 1
_PARTIAL_MAX_AGE_S = 15 * 60  # an orphaned zarr *.partial older than this belongs to a dead writer


class StoreError(RuntimeError):
    pass


class IncompleteError(StoreError):
    """Something was read that has not been completely written."""


class StoreFormatError(StoreError):
    pass


class StoreMismatchError(StoreError):
    """An existing array was made with other parameters than the ones asked for now."""


def _is_url(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


class StoreRoot:
    """A store root on a local disk or any fsspec filesystem.

    Small JSON records (format marker, shard records) go through fsspec directly; arrays go
    through zarr. Local JSON writes are atomic (write + rename); object-store PUTs are atomic
    by nature, so a killed writer never leaves a half-written record.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/") if _is_url(url) else url.removeprefix("file://")
        self.storage_options = dict(storage_options or {})
        self.is_local = not _is_url(self.url)
        self.fs, self.base = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.base = self.base.rstrip("/")
        self._zarr_store = None

    def __repr__(self) -> str:
        return f"StoreRoot({self.url!r})"

    # -- raw objects ----------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        return f"{self.base}/{key}" if key else self.base

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._full(key))

    def read_json(self, key: str) -> dict | None:
        try:
            with self.fs.open(self._full(key), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_json(self, key: str, obj: Any) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        full = self._full(key)
        if self.is_local:
            self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{full}.{uuid.uuid4().hex}.tmp"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, full)
        else:
            self.fs.pipe_file(full, data)

    def list_names(self, prefix: str, folders: bool = False) -> list[str]:
        """Names directly under `prefix`, sorted; [] if it does not exist."""
        try:
            entries = self.fs.ls(self._full(prefix), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                      if not folders or e["type"] == "directory")

    def delete(self, key: str) -> None:
        if self.exists(key):
            self.fs.rm(self._full(key), recursive=True)

    def zarr_store(self):
        if self._zarr_store is None:
            if self.is_local:
                self.fs.makedirs(self.base, exist_ok=True)
                self._zarr_store = zarr.storage.LocalStore(self.base)
            else:
                self._zarr_store = zarr.storage.FsspecStore.from_url(
                    self.url, storage_options=self.storage_options or None
                )
        return self._zarr_store

    # -- format ---------------------------------------------------------------------------------
    def ensure_format(self, create: bool) -> None:
        """Refuse stores written by a newer format; stamp new ones."""
        meta = self.read_json("mdiff.json")
        if meta is None:
            if create:
                self.write_json("mdiff.json", {"format": FORMAT, "version": FORMAT_VERSION})
            return
        check_format_version(meta, f"{self.url}/mdiff.json")


def check_format_version(meta: dict, where: str) -> None:
    version = meta.get("version", meta.get("format_version"))
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreFormatError(
            f"{where} was written by store format {version!r}, but this mdiff reads format "
            f"{FORMAT_VERSION} and older: upgrade mdiff (pip install -U mdiff) to read it."
        )


# -- layout -------------------------------------------------------------------------------------
def tokenset_path(tokenset_id: str) -> str:
    return f"tokensets/{tokenset_id}"


def activation_path(tokenset_id: str, model_key: str, hook_label: str) -> str:
    return f"activations/{tokenset_id}/{model_key}/{hook_label}"


# -- dtype encoding -------------------------------------------------------------------------------
_ZARR_DTYPE = {"bfloat16": "uint16", "float32": "float32"}


def encode(t: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """Tensor -> the numpy array zarr stores. bfloat16 is kept as its raw bits in uint16."""
    if storage_dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().cpu().view(torch.uint16).numpy()
    return t.to(torch.float32).contiguous().cpu().numpy()


def decode(a: np.ndarray, storage_dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if storage_dtype == "bfloat16" else t


def checksum(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).data)


# -- token sets ----------------------------------------------------------------------------------
@dataclass
class TokenSet:
    """A complete token set: tokens [n_sequences, context_length] and each sequence's source."""

    id: str
    tokens: zarr.Array
    source: zarr.Array
    attrs: dict

    @property
    def n_sequences(self) -> int:
        return self.tokens.shape[0]

    @property
    def context_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_train_sequences(self) -> int:
        return int(self.attrs["n_train_sequences"])


def token_set_complete(root: StoreRoot, tokenset_id: str) -> bool:
    return root.exists(f"{tokenset_path(tokenset_id)}/_complete.json")


def write_token_set(root: StoreRoot, tokenset_id: str, n_sequences: int, context_length: int,
                    blocks, attrs: dict) -> TokenSet:
    """Write the token set from an iterator of (tokens, source) blocks, then mark it complete.

    Idempotent: the id is a hash of everything that determines the tokens, so a second writer
    (a concurrent job, or a rerun after a kill) writes the very same bytes.
    """
    store = root.zarr_store()
    path = tokenset_path(tokenset_id)
    rows = max(1, min(n_sequences, (1 << 20) // (4 * context_length)))  # ~1 MiB token chunks
    try:
        group = zarr.create_group(store=store, path=path, attributes={})
        tokens = group.create_array("tokens", shape=(n_sequences, context_length), dtype="int32",
                                    chunks=(rows, context_length), compressors=None, fill_value=0)
        source = group.create_array("source", shape=(n_sequences,), dtype="uint8",
                                    chunks=(max(rows, 4096),), compressors=None, fill_value=0)
    except zarr.errors.ContainsGroupError:
        group = zarr.open_group(store=store, path=path, mode="r+")
        tokens, source = group["tokens"], group["source"]
        if tokens.shape != (n_sequences, context_length):
            raise StoreMismatchError(
                f"{root.url}/{path}/tokens has shape {tokens.shape}, expected "
                f"{(n_sequences, context_length)}: the store is damaged; delete that folder."
            )
    start = 0
    for tok_block, src_block in blocks:
        stop = start + len(tok_block)
        tokens[start:stop] = tok_block
        source[start:stop] = src_block
        start = stop
    if start != n_sequences:
        raise StoreError(f"token set {tokenset_id}: got {start} sequences, expected {n_sequences}")
    group.attrs.update({"format_version": FORMAT_VERSION, **attrs})
    root.write_json(f"{path}/_complete.json", {"n_sequences": n_sequences, "time": time.time()})
    return open_token_set(root, tokenset_id)


def open_token_set(root: StoreRoot, tokenset_id: str) -> TokenSet:
    path = tokenset_path(tokenset_id)
    if not token_set_complete(root, tokenset_id):
        raise IncompleteError(
            f"token set {tokenset_id} in {root.url} is missing or incomplete; "
            f"run `mdiff cache <config>` to (re)build it."
        )
    group = zarr.open_group(store=root.zarr_store(), path=path, mode="r")
    attrs = group.attrs.asdict()
    check_format_version(attrs, f"{root.url}/{path}")
    return TokenSet(tokenset_id, group["tokens"], group["source"], attrs)


# -- activation arrays ---------------------------------------------------------------------------
@dataclass
class ActivationArray:
    """One [n_tokens, d_model] array of normalized activations and its completion records."""

    root: StoreRoot
    path: str
    array: zarr.Array
    attrs: dict

    @property
    def n_rows(self) -> int:
        return self.array.shape[0]

    @property
    def shard_rows(self) -> int:
        return int(self.attrs["shard_rows"])

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    @property
    def scale(self) -> float:
        return float(self.attrs["scale"])

    @property
    def storage_dtype(self) -> str:
        return self.attrs["storage_dtype"]

    def shard_rows_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n_rows)

    def check_structure(self, structure: dict) -> None:
        """Refuse to add rows made with other settings to an existing array."""
        differ = {k: (self.attrs.get(k), v) for k, v in structure.items() if self.attrs.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: stored {a!r}, asked {b!r}" for k, (a, b) in differ.items())
            raise StoreMismatchError(
                f"{self.root.url}/{self.path} exists with other parameters ({detail}). Use the "
                f"stored settings in the config's [cache] section, or another store root."
            )

    # completion ---------------------------------------------------------------------------------
    def done_shards(self) -> set[int]:
        names = self.root.list_names(f"{self.path}/_done")
        return {int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()}

    def is_complete(self) -> bool:
        return self.root.exists(f"{self.path}/_complete.json")

    def write_shard(self, shard: int, data: np.ndarray, writer: str = "") -> None:
        """Write one whole shard, then record it with per-chunk checksums (in that order)."""
        start, stop = self.shard_rows_range(shard)
        if data.shape != (stop - start, self.array.shape[1]):
            raise ValueError(f"shard {shard}: data {data.shape}, expected {(stop - start, self.array.shape[1])}")
        self.array[start:stop] = data
        crcs = [checksum(data[i:i + self.chunk_rows]) for i in range(0, stop - start, self.chunk_rows)]
        record = {"shard": shard, "rows": [start, stop], "chunk_crc32": crcs,
                  "scale": self.scale, "writer": writer, "time": time.time()}
        self.root.write_json(f"{self.path}/_done/{shard:08d}.json", record)

    def finalize(self) -> bool:
        """Write the completion record if every shard is recorded; returns completeness."""
        if self.is_complete():
            return True
        done = self.done_shards()
        if len(done) < self.n_shards:
            return False
        crcs = []
        for shard in range(self.n_shards):
            rec = self.root.read_json(f"{self.path}/_done/{shard:08d}.json")
            if rec is None or rec.get("scale") != self.scale:
                return False
            crcs.extend(rec["chunk_crc32"])
        self.root.write_json(f"{self.path}/_complete.json",
                             {"n_shards": self.n_shards, "chunk_crc32": crcs, "time": time.time()})
        return True

    def progress(self) -> tuple[int, int]:
        if self.is_complete():
            return self.n_shards, self.n_shards
        return len(self.done_shards() & set(range(self.n_shards))), self.n_shards

    def require_complete(self) -> None:
        if self.is_complete():
            return
        done, total = self.progress()
        missing_rows = sum(
            self.shard_rows_range(s)[1] - self.shard_rows_range(s)[0]
            for s in set(range(total)) - self.done_shards()
        )
        hint = self.attrs.get("produced_by", {}).get("config") or "<experiment config>"
        raise IncompleteError(
            f"{self.root.url}/{self.path} is incomplete: {done}/{total} shards written, "
            f"{missing_rows:,} of {self.n_rows:,} token rows missing. "
            f"Finish it with: mdiff cache {hint}"
        )

    def chunk_checksums(self) -> list[int] | None:
        rec = self.root.read_json(f"{self.path}/_complete.json")
        if rec is not None:
            return rec["chunk_crc32"]
        return None

    def remove_stale_partials(self) -> int:
        """zarr writes chunks to *.partial then renames; a killed writer leaves the temp file."""
        if not self.root.is_local:
            return 0
        removed = 0
        for f in self.root.fs.find(self.root._full(f"{self.path}/c")):
            if ".partial" in f.rsplit("/", 1)[-1]:
                info = self.root.fs.info(f)
                if time.time() - info.get("mtime", time.time()) > _PARTIAL_MAX_AGE_S:
                    self.root.fs.rm(f)
                    removed += 1
        return removed


def _codecs(compression: str, storage_dtype: str):
    if compression == "none":
        return None
    typesize = 2 if storage_dtype == "bfloat16" else 4
    # Byte shuffle with the right typesize and >= 1 MiB blocks: 1.16x on real-looking activations
    # (shared/docs/storage-measurements.md); smaller blocks or typesize 1 make shuffle useless.
    return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=typesize,
                       blocksize=1 << 20)]


def create_activation_array(root: StoreRoot, path: str, *, n_rows: int, d_model: int,
                            chunk_rows: int, shard_rows: int, storage_dtype: str,
                            compression: str, attrs: dict) -> ActivationArray:
    """Create the array, or open it when it exists with the same structure.

    When it already exists its recorded attributes (the scale above all) win: a second job
    adopts the first job's scale instead of mixing two scales in one array.
    """
    structure = dict(n_rows=n_rows, d_model=d_model, chunk_rows=chunk_rows,
                     shard_rows=shard_rows, storage_dtype=storage_dtype, compression=compression)
    try:
        zarr.create_array(
            store=root.zarr_store(), name=path, shape=(n_rows, d_model),
            chunks=(chunk_rows, d_model), shards=(shard_rows, d_model),
            dtype=_ZARR_DTYPE[storage_dtype], compressors=_codecs(compression, storage_dtype),
            fill_value=0, attributes={"format_version": FORMAT_VERSION, **structure, **attrs},
        )
    except zarr.errors.ContainsArrayError:
        pass
    arr = open_activation_array(root, path)
    arr.check_structure(structure)
    return arr


def open_activation_array(root: StoreRoot, path: str, require_complete: bool = False
                          ) -> ActivationArray:
    try:
        array = zarr.open_array(store=root.zarr_store(), path=path, mode="r+")
    except (FileNotFoundError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError) as e:
        raise IncompleteError(f"no activation array at {root.url}/{path}; run `mdiff cache <config>`") from e
    attrs = array.attrs.asdict()
    check_format_version(attrs, f"{root.url}/{path}")
    arr = ActivationArray(root, path, array, attrs)
    if require_complete:
        arr.require_complete()
    return arr


def read_rows(arr: ActivationArray, start: int, stop: int) -> torch.Tensor:
    """Normalized activations of rows [start, stop) in their stored dtype."""
    return decode(arr.array[start:stop], arr.storage_dtype)


# -- listing and verification --------------------------------------------------------------------
def list_token_sets(root: StoreRoot) -> list[str]:
    return [n for n in root.list_names("tokensets", folders=True) if n.startswith("ts-")]


def list_activation_arrays(root: StoreRoot) -> list[str]:
    paths = []
    for ts in root.list_names("activations", folders=True):
        for model in root.list_names(f"activations/{ts}", folders=True):
            for hook in root.list_names(f"activations/{ts}/{model}", folders=True):
                if root.exists(f"activations/{ts}/{model}/{hook}/zarr.json"):
                    paths.append(activation_path(ts, model, hook))
    return paths


@dataclass
class BadChunk:
    path: str
    chunk: int
    rows: tuple[int, int]
    reason: str


def verify_array(arr: ActivationArray, progress=None) -> list[BadChunk]:
    """Decode every recorded chunk and compare it with the checksum recorded at write time."""
    bad = []
    for shard in sorted(arr.done_shards()):
        rec = arr.root.read_json(f"{arr.path}/_done/{shard:08d}.json")
        start, stop = rec["rows"]
        for i, expected in enumerate(rec["chunk_crc32"]):
            lo = start + i * arr.chunk_rows
            hi = min(lo + arr.chunk_rows, stop)
            chunk_index = lo // arr.chunk_rows
            try:
                got = checksum(arr.array[lo:hi])
                reason = None if got == expected else f"checksum {got:#010x} != recorded {expected:#010x}"
            except Exception as e:  # a torn or truncated file fails to decode
                reason = f"unreadable: {type(e).__name__}: {e}"
            if reason:
                bad.append(BadChunk(arr.path, chunk_index, (lo, hi), reason))
            if progress is not None:
                progress.update(hi - lo)
    return bad
