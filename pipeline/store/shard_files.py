"""Reading an array's shard files directly, without zarr: where each inner chunk's bytes are.

For local uncompressed arrays the loader skips zarr's decoding and reads chunk bytes straight
from the shard files (`os.preadv` into its buffers). This module finds the files, parses and
checks their indexes, says whether the page cache holds a byte range, and reads bytes. That needs the shard file format, which is
the store's business: each file ends with its index (per inner chunk two little-endian uint64,
offset and nbytes, then a crc32c of the index), and a chunk that was never written is absent
from it. What to read into, and how, is the reader's (trainer/readers.py).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np

from pipeline.store import layout
from pipeline.store.arrays import ActivationArray
from pipeline.store.encoding import NUMPY_DTYPE
from pipeline.store.errors import CorruptChunkError
from pipeline.store.verify import corrupt_chunk

MISSING = 2**64 - 1  # sharding index entry of an inner chunk that was never written


def shard_files_unsupported(arr: ActivationArray) -> str | None:
    """Why the shard files of `arr` cannot be read directly (None: they can)."""
    if not arr.root.is_local:
        return "the store is not on a local disk"
    if arr.attrs.get("compression") != "none":
        return f"the array is compressed ({arr.attrs.get('compression')!r})"
    if sys.byteorder != "little":
        return "this machine is big-endian"
    meta = arr.array.metadata
    codecs = getattr(meta, "codecs", ())
    d = arr.d_model
    if len(codecs) != 1 or type(codecs[0]).__name__ != "ShardingCodec":
        return "the array is not stored with one sharding_indexed codec"
    sh = codecs[0]
    layout_ok = (
        tuple(sh.chunk_shape) == (arr.chunk_rows, d)
        and tuple(meta.chunk_grid.chunk_shape) == (arr.shard_rows, d)
        and [type(c).__name__ for c in sh.codecs] == ["BytesCodec"]
        and getattr(sh.codecs[0].endian, "value", "little") == "little"
        and [type(c).__name__ for c in sh.index_codecs] == ["BytesCodec", "Crc32cCodec"]
        and getattr(sh.index_location, "value", sh.index_location) == "end"
        and layout.has_standard_chunk_keys(meta)
    )
    if not layout_ok:
        return "its shards are not laid out as storage_layout.md describes"
    return None


class ShardFiles:
    """The shard files of one local, uncompressed array.

    Each shard file's index is read once and kept. Files are opened per read (microseconds
    against a multi-MiB read) so that huge stores never hold thousands of descriptors.
    """

    def __init__(self, arr: ActivationArray):
        self.arr = arr
        self.chunks_per_shard = arr.shard_rows // arr.chunk_rows
        self.row_bytes = arr.d_model * np.dtype(NUMPY_DTYPE[arr.storage_dtype]).itemsize
        self.chunk_bytes = arr.chunk_rows * self.row_bytes
        self._index: dict[int, np.ndarray | None] = {}
        try:
            import google_crc32c  # zarr's own dependency for the crc32c codec
            self._crc32c = google_crc32c.value
        except ImportError:  # pragma: no cover - the index is then checked for plausibility only
            self._crc32c = None

    def shard_file(self, shard: int) -> str:
        key = layout.shard_file(self.arr.path, self.arr.array.metadata, shard)
        return os.path.join(self.arr.root.base, *key.split("/"))

    def _bad(self, chunk: int, lo: int, hi: int, what: str) -> CorruptChunkError:
        return corrupt_chunk(self.arr, chunk, lo, hi, what)

    def index(self, shard: int) -> np.ndarray | None:
        """[chunks_per_shard, 2] (offset, nbytes) of one shard file; None if there is no file."""
        if shard in self._index:
            return self._index[shard]
        path = self.shard_file(shard)
        n = self.chunks_per_shard
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            idx = None  # zarr writes no file for a shard whose chunks are all fill value
        else:
            try:
                size = os.fstat(fd).st_size
                nb = 16 * n + 4
                raw = os.pread(fd, nb, size - nb) if size >= nb else b""
            finally:
                os.close(fd)
            first = shard * n
            rows = (first * self.arr.chunk_rows, min((first + n) * self.arr.chunk_rows, self.arr.n_rows))
            if len(raw) != nb or (self._crc32c is not None
                                  and self._crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little")):
                raise self._bad(first, *rows, f"is unreadable: shard file {path} has a damaged "
                                f"or truncated index (chunks {first}-{first + n - 1})")
            idx = np.frombuffer(raw[:-4], dtype="<u8").reshape(n, 2)
            present = idx[:, 0] != MISSING
            if np.any(idx[present, 0] + idx[present, 1] > size - nb):
                raise self._bad(first, *rows, f"is unreadable: shard file {path} is truncated")
        self._index[shard] = idx  # a racing thread stores the same thing
        return idx

    def chunk_location(self, chunk: int) -> tuple[int, int, int] | None:
        """(shard, offset, stored nbytes) of a chunk in its shard file; None when the file does
        not hold it (zarr skips writing chunks equal to the fill value)."""
        shard, j = divmod(chunk, self.chunks_per_shard)
        idx = self.index(shard)
        if idx is None or idx[j, 0] == MISSING:
            return None
        return shard, int(idx[j, 0]), int(idx[j, 1])

    def open(self, shard: int, flags: int = 0) -> int:
        """A descriptor of the shard file (flags: e.g. os.O_DIRECT); the caller closes it."""
        return os.open(self.shard_file(shard), os.O_RDONLY | flags)

    def read_at(self, fd: int, view: memoryview, offset: int, where) -> None:
        """Fill `view` from the file at `offset` (`where`: (chunk, lo, hi), for errors)."""
        pos = 0
        while pos < len(view):
            got = os.preadv(fd, [view[pos:]], offset + pos)
            if got <= 0:
                raise self._bad(*where, "is truncated")
            pos += got

    def pread(self, shard: int, view: memoryview, offset: int, flags: int, where) -> None:
        """Fill `view` from the shard file at `offset` (`where`: (chunk, lo, hi), for errors)."""
        fd = self.open(shard, flags)
        try:
            self.read_at(fd, view, offset, where)
        finally:
            os.close(fd)


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):  # pragma: no cover - not a POSIX libc
        return None


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def page_cache_holds(fd: int, offset: int, length: int) -> bool | None:
    """Whether every page of bytes [offset, offset + length) of the file is in the page cache,
    asked without reading (mincore on a mapping that is never touched); None where it cannot be
    told. A read with RWF_NOWAIT would answer too, but on a miss it starts the kernel's readahead
    (2 MiB measured here): pages the caller meant to read with O_DIRECT, read twice."""
    if _LIBC is None or length <= 0:
        return None
    page = mmap.PAGESIZE
    start = offset - offset % page
    span = offset + length - start
    addr = _LIBC.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, _MAP_FAILED):
        return None
    try:
        n = -(-span // page)
        vec = (ctypes.c_ubyte * n)()
        if _LIBC.mincore(addr, span, vec) != 0:
            return None
        return bool((np.frombuffer(vec, np.uint8) & 1).all())
    finally:
        _LIBC.munmap(addr, span)
