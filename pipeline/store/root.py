"""A store root: small records and Zarr access on a local disk or any fsspec filesystem.

Everything the store writes goes through one StoreRoot, so the choice between a local directory
and an object store (and what "atomic" means on each) is made here once: local JSON writes are
written to a temporary name and renamed, object-store PUTs are atomic by nature, so a killed
writer never leaves a half-written record.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from typing import Any

import fsspec
import zarr

from pipeline.locations import is_remote, local_path
from pipeline.store.errors import write_errors
from pipeline.store.layout import FORMAT, FORMAT_MARKER, FORMAT_VERSION, check_format_version, check_key


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

    def ensure_format(self, create: bool) -> None:
        """Refuse stores written by a newer format; stamp new ones."""
        meta = self.read_json(FORMAT_MARKER)
        if meta is None:
            if create:
                self.write_json(FORMAT_MARKER, {"format": FORMAT, "version": FORMAT_VERSION})
            return
        check_format_version(meta, f"{self.url}/{FORMAT_MARKER}")
