"""Activation arrays: creating, opening and reading them, and recording their shards complete.

Zarr itself cannot say whether a chunk was ever written (a missing chunk reads as the fill
value), so completion is recorded here, per shard, after the write returns; readers trust those
records and nothing else. One array is one (model, hook, token set); its attributes (the scale
above all) are fixed by whoever creates it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from pipeline.store import layout
from pipeline.store.encoding import ZARR_DTYPE, checksum, compression_codecs, decode
from pipeline.store.errors import IncompleteError, StoreError, StoreMismatchError, write_errors
from pipeline.store.layout import FORMAT_VERSION, check_format_version, check_key
from pipeline.store.root import StoreRoot

_PARTIAL_MAX_AGE_S = 15 * 60  # an orphaned zarr *.partial older than this belongs to a dead writer


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
    def d_model(self) -> int:
        return self.array.shape[1]

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

    def stored_scale(self):
        """The scale in the store's metadata now (another job may have re-created the array)."""
        return self.root.read_json(layout.array_metadata(self.path))["attributes"]["scale"]

    def done_shards(self) -> set[int]:
        names = self.root.list_names(layout.shard_records(self.path))
        return {s for s in map(layout.shard_record_number, names) if s is not None}

    def is_complete(self) -> bool:
        return self.root.exists(layout.complete_record(self.path))

    def write_shard(self, shard: int, data: np.ndarray, writer: str = "") -> None:
        """Write one whole shard, then record it with per-chunk checksums (in that order)."""
        start, stop = self.shard_rows_range(shard)
        if data.shape != (stop - start, self.d_model):
            raise ValueError(f"shard {shard}: data {data.shape}, expected {(stop - start, self.d_model)}")
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
        self.root.write_json(layout.shard_record(self.path, shard), record)

    def _discard_undecodable_shard(self, shard: int) -> bool:
        """Delete the shard's file if it exists and zarr cannot decode it; returns whether it did."""
        start, stop = self.shard_rows_range(shard)
        try:
            self.array[start:stop]
        except ValueError:  # checksum or size mismatch in the shard index: damaged, not unreachable
            self.root.delete(layout.shard_file(self.path, self.array.metadata, shard))
            return True
        return False

    def shard_record(self, shard: int) -> dict | None:
        """The completion record of one shard (None: not recorded)."""
        return self.root.read_json(layout.shard_record(self.path, shard))

    def finalize(self) -> bool:
        """Write the completion record if every shard is recorded; returns completeness."""
        if self.is_complete():
            return True
        done = self.done_shards()
        if len(done) < self.n_shards:
            return False
        crcs = []
        for shard in range(self.n_shards):
            rec = self.shard_record(shard)
            if rec is None or rec.get("scale") != self.scale:
                return False
            crcs.extend(rec["chunk_crc32"])
        self.root.write_json(layout.complete_record(self.path),
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
        rec = self.root.read_json(layout.complete_record(self.path))
        if rec is not None:
            return rec["chunk_crc32"]
        return None

    def complete_checksums(self) -> list[int]:
        """Every chunk's CRC-32 from the completion record, which must list them all."""
        crcs = self.chunk_checksums()
        n = -(-self.n_rows // self.chunk_rows)
        if crcs is None or len(crcs) != n:
            raise StoreError(f"{self.root.url}/{layout.complete_record(self.path)} does not list {n} "
                             "chunk checksums")
        return crcs

    def remove_stale_partials(self) -> int:
        """zarr writes chunks to *.partial then renames; a killed writer leaves the temp file."""
        if not self.root.is_local:
            return 0
        removed = 0
        for f in self.root.fs.find(self.root._full(layout.chunks_path(self.path))):
            if layout.is_partial_file(f.rsplit("/", 1)[-1]):
                info = self.root.fs.info(f)
                if time.time() - info.get("mtime", time.time()) > _PARTIAL_MAX_AGE_S:
                    self.root.fs.rm(f)
                    removed += 1
        return removed


def array_exists(root: StoreRoot, path: str) -> bool:
    """Whether an array (complete or not) was created at `path`."""
    return root.exists(layout.array_metadata(path))


def array_complete(root: StoreRoot, path: str) -> bool:
    """Whether the array at `path` is complete, without opening it."""
    return root.exists(layout.complete_record(path))


def array_attributes(root: StoreRoot, path: str) -> dict:
    """The attributes recorded with the array at `path`, without opening it ({} if none)."""
    meta = root.read_json(layout.array_metadata(path)) or {}
    return meta.get("attributes") or {}


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
                dtype=ZARR_DTYPE[storage_dtype], compressors=compression_codecs(compression, storage_dtype),
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
