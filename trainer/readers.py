"""Reading one chunk of one array into its slot of the loader's window buffer.

Readers: "zarr" decodes chunks through zarr (any store, compressed or not); "mmap" reads the
inner chunks' bytes straight from the local shard files (the name is the config's; it uses
``os.preadv`` into page-aligned buffers, which measured faster here than numpy.memmap slicing
and than zarr: see ``benchmarks/bench_loader.py``); "auto" takes "mmap" for every local
uncompressed array and "zarr" for the others. Where the shard files and their chunks are is the
store's knowledge (pipeline/store/shard_files.py); this module decides how to read into the
loader's buffers (strided slots, O_DIRECT, the all-zero chunks zarr never writes).
"""

from __future__ import annotations

import errno
import os

import numpy as np

from pipeline import store as S

_DIRECT_ALIGN = 4096  # O_DIRECT: offsets, lengths and memory in whole blocks


def where(arr: S.ActivationArray) -> str:
    return f"{arr.root.url}/{arr.path}"


def aligned_empty(shape, dtype, align: int = 4096) -> np.ndarray:
    """np.empty whose data starts on a page boundary.

    The kernel copies file pages into a destination 16 bytes off a 64-byte boundary (where
    malloc puts large numpy arrays) 3-4x slower: 1.5 vs 5.3 GB/s from the page cache here.
    """
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(n + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + n].view(dtype).reshape(shape)


class ZarrReader:
    """Chunks decoded by zarr, straight into the window-buffer slot (zarr's `out=`)."""

    name = "zarr"

    def __init__(self, arr: S.ActivationArray):
        from zarr.core.buffer import default_buffer_prototype

        self.arr = arr
        self._nd = default_buffer_prototype().nd_buffer

    def read(self, chunk: int, lo: int, hi: int, dest: np.ndarray, scratch) -> np.ndarray:
        """Returns the array now holding the chunk (here `dest`, maybe strided)."""
        try:
            self.arr.array.get_basic_selection(slice(lo, hi), out=self._nd.from_numpy_array(dest))
        except Exception as e:  # noqa: BLE001 - a damaged shard fails inside zarr's codecs
            what = f"could not be read ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
            if S.is_connection_error(e):
                raise S.StoreError(f"{where(self.arr)}: chunk {chunk} (rows {lo}-{hi}) {what}: the store "
                                   "is unreachable. Once it is reachable again, continue with "
                                   "`mdiff train <config> --resume`") from e
            raise S.corrupt_chunk(self.arr, chunk, lo, hi, what) from e
        return dest


class ShardFileReader(S.ShardFiles):
    """Inner chunks read straight from the shard files (uncompressed, local stores).

    A chunk is one `os.preadv` into the window-buffer slot (into a reused per-thread scratch
    buffer and one copy when the slot is strided, i.e. with several models).
    """

    name = "mmap"

    def __init__(self, arr: S.ActivationArray, crcs: list[int], direct: bool = False):
        why = S.shard_files_unsupported(arr)
        if why:
            raise ValueError(f"reader 'mmap' cannot read {where(arr)}: {why}; use reader 'zarr' or 'auto'")
        super().__init__(arr)
        self.crcs = crcs
        self.direct = bool(direct) and hasattr(os, "O_DIRECT")

    def read(self, chunk: int, lo: int, hi: int, dest: np.ndarray, scratch) -> np.ndarray | None:
        """Returns a contiguous array holding the chunk (so its checksum needs no extra copy), or
        None for a chunk already checked here."""
        location = self.chunk_location(chunk)
        nbytes = (hi - lo) * self.row_bytes
        if location is None:
            # zarr skips chunks equal to the fill value (0): legitimate iff that is what was written
            if self.crcs[chunk] == S.crc32(bytes(nbytes)):
                dest[...] = 0
                return None
            raise self._bad(chunk, lo, hi, "is missing from its shard file, but was recorded "
                            "with non-zero data")
        shard, offset, stored = location
        if stored != self.chunk_bytes:
            raise self._bad(chunk, lo, hi, f"has {stored} stored bytes, expected {self.chunk_bytes} "
                            "(an uncompressed chunk)")
        if self.direct and offset % _DIRECT_ALIGN == 0 and self.chunk_bytes % _DIRECT_ALIGN == 0:
            # O_DIRECT wants offset, length and memory aligned: whole blocks, into a contiguous
            # aligned destination or else the (page-aligned) scratch buffer
            length = -(-nbytes // _DIRECT_ALIGN) * _DIRECT_ALIGN
            direct_ok = (length == nbytes and dest.flags.c_contiguous
                         and dest.ctypes.data % _DIRECT_ALIGN == 0)
            target = dest if direct_ok else scratch(self.arr.chunk_rows)
            try:
                self.pread(shard, memoryview(target).cast("B")[:length], offset, os.O_DIRECT,
                           (chunk, lo, hi))
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False  # this filesystem refuses O_DIRECT: buffered from now on
            else:
                if target is not dest:
                    np.copyto(dest, target[: hi - lo])
                return target[: hi - lo]
        target = dest if dest.flags.c_contiguous else scratch(hi - lo)
        self.pread(shard, memoryview(target).cast("B"), offset, 0, (chunk, lo, hi))
        if target is not dest:
            np.copyto(dest, target)
        return target


def open_readers(arrays: list[S.ActivationArray], reader: str, verify: bool, direct_io: bool
                 ) -> tuple[list[list[int] | None], list]:
    """(recorded checksums, reader) per array: per array, so "auto" can mix local uncompressed
    and other arrays. Checksums are loaded where the reader or `verify` needs them."""
    crcs: list[list[int] | None] = [None] * len(arrays)
    readers = []
    for i, arr in enumerate(arrays):
        use_shards = reader == "mmap" or (reader == "auto" and S.shard_files_unsupported(arr) is None)
        if use_shards or verify:
            crcs[i] = arr.complete_checksums()
        readers.append(ShardFileReader(arr, crcs[i], direct=direct_io) if use_shards else ZarrReader(arr))
    return crcs, readers
