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

import contextlib
import errno
import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from pipeline.locations import is_remote, local_path

try:  # zlib's CRC-32, ~4x faster (13-16 vs 3.7 GB/s here): the loader checks every chunk it reads
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; zlib gives the same values
    from zlib import crc32

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


class StoreWriteError(StoreError):
    """A write to the store failed; nothing of what it was writing was recorded."""


class StoreFullError(StoreWriteError):
    """The store's device ran out of space (ENOSPC or a quota)."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


_CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectionClosedError", "ClientConnectionError",
                      "ServerDisconnectedError", "ReadTimeoutError", "ConnectTimeoutError"}


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a lost or refused connection: an object store's
    botocore/aiohttp errors are not OSErrors, so they are recognized by class name."""
    while exc is not None:
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(
                c.__name__ in _CONNECTION_ERRORS for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the device is full. Libraries written in Rust or C
    (safetensors) raise their own types and say it only in the message."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class StoreRoot:
    """A store root on a local disk or any fsspec filesystem.

    Small JSON records (format marker, shard records) go through fsspec directly; arrays go
    through zarr. Local JSON writes are atomic (write + rename); object-store PUTs are atomic
    by nature, so a killed writer never leaves a half-written record.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/") if is_remote(url) else local_path(url)
        self.storage_options = dict(storage_options or {})
        self.is_local = not is_remote(self.url)
        self.fs, self.base = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.base = self.base.rstrip("/")
        self._zarr_store = None

    def __repr__(self) -> str:
        return f"StoreRoot({self.url!r})"

    # -- raw objects ----------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        return f"{self.base}/{check_key(key)}" if key else self.base

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
        with write_errors(f"{self.url}/{key}", len(data), self):
            if self.is_local:
                self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
                tmp = f"{full}.{uuid.uuid4().hex}.tmp"
                try:
                    self.fs.pipe_file(tmp, data)
                    self.fs.mv(tmp, full)
                except BaseException:
                    with contextlib.suppress(OSError):  # a full disk: give the space back
                        self.fs.rm(tmp)
                    raise
            else:
                self.fs.pipe_file(full, data)

    def free_bytes(self) -> int | None:
        """Free space on a local store's device (None for object stores)."""
        if not self.is_local:
            return None
        path = self.base
        while path and not self.fs.exists(path):
            path = path.rsplit("/", 1)[0]
        try:
            return shutil.disk_usage(path or "/").free
        except OSError:
            return None

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


@contextlib.contextmanager
def write_errors(what: str, nbytes: int, root: StoreRoot):
    """Turn a failed write into one StoreWriteError that says what was being written and why.

    A full device becomes a StoreFullError that says how much the write needed; connection
    errors of object stores (botocore, aiohttp: not OSErrors) become StoreWriteError. The caller
    records nothing after a failure, so the rerun redoes exactly what failed.
    """
    try:
        yield
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend's failure becomes one clear error
        cause = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        resume = "rerun the job: it resumes after what is recorded (nothing of this write is)."
        if is_no_space(e):
            free = root.free_bytes()
            free_text = f", {human_bytes(free)} free" if free is not None else ""
            raise StoreFullError(
                f"no space left on the store's device writing {what} (needs "
                f"{human_bytes(nbytes)}{free_text}; {cause}). Free space on that device or move "
                f"the store, then {resume}"
            ) from e
        raise StoreWriteError(f"could not write {what} ({cause}). Once the store is reachable "
                              f"again, {resume}") from e


def check_format_version(meta: dict, where: str) -> None:
    version = meta.get("version", meta.get("format_version"))
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreFormatError(
            f"{where} was written by store format {version!r}, but this mdiff reads format "
            f"{FORMAT_VERSION} and older: upgrade mdiff (pip install -U mdiff) to read it."
        )


# -- layout -------------------------------------------------------------------------------------
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


def tokenset_path(tokenset_id: str) -> str:
    return check_key(f"tokensets/{tokenset_id}")


def activation_path(tokenset_id: str, model_key: str, hook_label: str) -> str:
    return check_key(f"activations/{tokenset_id}/{model_key}/{hook_label}")


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
    return crc32(np.ascontiguousarray(a).view(np.uint8).data)


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

    def member(group, name: str, **spec):
        # each piece on its own: a writer stopped between them leaves the group without the rest
        try:
            return group.create_array(name, compressors=None, fill_value=0, **spec)
        except zarr.errors.ContainsArrayError:
            return group[name]

    # The attributes go in with the group, not only at the end: zarr's create_group checks for an
    # existing group and then writes, so a second job that passed the check while the first was
    # finishing rewrote the group's metadata after the first had completed; with empty attributes
    # that lost n_train_sequences under the first job's feet. Now every writer writes the same.
    final_attrs = {"format_version": FORMAT_VERSION, **attrs}
    with write_errors(f"the metadata of token set {root.url}/{path}", 0, root):
        try:
            group = zarr.create_group(store=store, path=path, attributes=final_attrs)
        except zarr.errors.ContainsGroupError:
            group = zarr.open_group(store=store, path=path, mode="r+")
        tokens = member(group, "tokens", shape=(n_sequences, context_length), dtype="int32",
                        chunks=(rows, context_length))
        source = member(group, "source", shape=(n_sequences,), dtype="uint8", chunks=(max(rows, 4096),))
    if tokens.shape != (n_sequences, context_length) or source.shape != (n_sequences,):
        raise StoreMismatchError(
            f"{root.url}/{path}/tokens has shape {tokens.shape}, expected "
            f"{(n_sequences, context_length)}: the store is damaged; delete that folder."
        )
    start = 0
    for tok_block, src_block in blocks:
        stop = start + len(tok_block)
        with write_errors(f"sequences {start}-{stop} of token set {root.url}/{path}",
                          tok_block.nbytes + src_block.nbytes, root):
            tokens[start:stop] = tok_block
            source[start:stop] = src_block
        start = stop
    if start != n_sequences:
        raise StoreError(f"token set {tokenset_id}: got {start} sequences, expected {n_sequences}")
    group.attrs.update(final_attrs)  # a group created by an older version has none yet
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
        with write_errors(f"shard {shard} (rows {start}-{stop}) of {self.root.url}/{self.path}",
                          data.nbytes, self.root):
            try:
                self.array[start:stop] = data
            except ValueError:
                # zarr merges a shard write into the existing file, so a damaged one (the
                # reason for a repair) fails to decode; the whole shard is being replaced anyway
                if not self._discard_undecodable_shard(shard):
                    raise
                self.array[start:stop] = data
        crcs = [checksum(data[i:i + self.chunk_rows]) for i in range(0, stop - start, self.chunk_rows)]
        record = {"shard": shard, "rows": [start, stop], "chunk_crc32": crcs,
                  "scale": self.scale, "writer": writer, "time": time.time()}
        self.root.write_json(f"{self.path}/_done/{shard:08d}.json", record)

    def _discard_undecodable_shard(self, shard: int) -> bool:
        """Delete the shard's file if it exists and zarr cannot decode it; returns whether it did."""
        start, stop = self.shard_rows_range(shard)
        try:
            self.array[start:stop]
        except ValueError:  # checksum or size mismatch in the shard index: damaged, not unreachable
            self.root.delete(f"{self.path}/{self.array.metadata.encode_chunk_key((shard, 0))}")
            return True
        return False

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
        produced = self.attrs.get("produced_by") or {}
        finish = (f"Finish it by rerunning (it resumes): {produced['command']}" if produced.get("command") else
                  f"Finish it with: mdiff cache {produced.get('config') or '<experiment config>'}")
        raise IncompleteError(
            f"{self.root.url}/{self.path} is incomplete: {done}/{total} shards written, "
            f"{missing_rows:,} of {self.n_rows:,} token rows missing. {finish}"
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
    with write_errors(f"the metadata of {root.url}/{check_key(path)}", 0, root):
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
    check_key(path)
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


def recorded_checksums(arr: ActivationArray) -> dict[int, int]:
    """chunk index -> CRC-32 recorded at write time: every chunk of a complete array (from
    _complete.json, so a lost shard record hides nothing), else those of the recorded shards."""
    crcs = arr.chunk_checksums()
    if crcs is not None:
        return dict(enumerate(crcs))
    out = {}
    for shard in sorted(arr.done_shards()):
        rec = arr.root.read_json(f"{arr.path}/_done/{shard:08d}.json")
        first = rec["rows"][0] // arr.chunk_rows
        out.update((first + i, c) for i, c in enumerate(rec["chunk_crc32"]))
    return out


def verify_array(arr: ActivationArray, progress=None) -> list[BadChunk]:
    """Decode every recorded chunk and compare it with the checksum recorded at write time."""
    bad = []
    for chunk_index, expected in sorted(recorded_checksums(arr).items()):
        lo = chunk_index * arr.chunk_rows
        hi = min(lo + arr.chunk_rows, arr.n_rows)
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
