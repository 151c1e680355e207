"""Reading one chunk of one array into its slot of the loader's window buffer, and checking it;
the page-aligned buffers the loader reads and gathers into.

Readers: "zarr" decodes chunks through zarr (any store, compressed or not); "mmap" reads the
inner chunks' bytes straight from the local shard files (the name is the config's; it uses
``os.preadv`` into page-aligned buffers, which measured faster here than numpy.memmap slicing
and than zarr: see ``benchmarks/bench_loader.py``); "auto" takes "mmap" for every local
uncompressed array and "zarr" for the others. Where the shard files and their chunks are is the
store's knowledge (pipeline/store/shard_files.py); this module decides how to read into the
loader's buffers (O_DIRECT or the page cache, the all-zero chunks zarr never writes).

Every slot is contiguous (the window buffer is [n_models, rows, d_model]), so a chunk is read
straight into it, and its CRC-32 is computed here, in the read thread: from the page cache in
pieces of ``PIECE`` bytes, each checked while it is still in the CPU cache.

Page cache or O_DIRECT, per chunk: where ``direct_rule`` chose O_DIRECT for a loader (see there),
the "mmap" reader still reads a chunk the page cache holds whole from there (it asks with
mincore, which reads nothing), so a warm store is read at memory speed whatever the setting.
"""

from __future__ import annotations

import errno
import os
import sys

import numpy as np

from pipeline import store as S
from pipeline.store.shard_files import page_cache_holds

_DIRECT_ALIGN = 4096  # O_DIRECT: offsets, lengths and memory in whole blocks
PIECE = 1 << 20  # read + checksum step from the page cache: stays in a 1 MiB L2 (measured 15% faster than whole)
DIRECT_MODES = ("auto", "always", "never")


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


class BufferPool:
    """Page-aligned arrays of one shape, each reused once nothing but the pool refers to it.

    A yielded batch, and any view of it, refers to its owner array through torch.from_numpy's
    storage, so an owner is free exactly when only the pool holds it. Reused, because
    page-faulting a fresh 32 MiB buffer per batch cost 8x in the gather; page-aligned like the
    windows, because np.take between buffers aligned differently ran 3x slower here."""

    def __init__(self, shape: tuple, dtype, keep: int):
        self.shape, self.dtype, self.keep = tuple(shape), np.dtype(dtype), int(keep)
        self._nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._owners: list[np.ndarray] = []

    def clear(self) -> None:
        self._owners = []

    def get(self) -> np.ndarray:
        owner = None
        for o in self._owners:
            if sys.getrefcount(o) <= 3:  # the list, `o` and getrefcount's argument
                owner = o
                break
        if owner is None:
            owner = np.empty(self._nbytes + 4096, np.uint8)
            if len(self._owners) < self.keep:
                self._owners.append(owner)
        start = (-owner.ctypes.data) % 4096
        return owner[start:start + self._nbytes].view(self.dtype).reshape(self.shape)


def memory_available() -> int | None:
    """Bytes the kernel could give the page cache now (MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def direct_rule(mode: str | bool, split_bytes: int, passes: float, available: int | None) -> tuple[bool, str]:
    """(use O_DIRECT for what the page cache does not hold, why) for one loader's arrays.

    "auto": buffered reads only when the page cache can pay them back: the split's bytes fit in
    half of the memory available and the caller means to read them at least twice (`passes`),
    so that the first pass fills the page cache and the later ones read from memory (warm reads
    ran 2.5-3x faster than the disk here). Otherwise O_DIRECT: cold, with the loader's 4 reads in
    flight on this project's machine, it read 1.0-1.4x as fast as buffered reads over several runs,
    with 1.3-2.2x less CPU (no page-cache copy and bookkeeping, one large request per chunk), and it
    leaves the page cache to the training process. Chunks the page cache holds are read from it
    either way.
    """
    mode = {True: "always", False: "never"}.get(mode, mode) if isinstance(mode, bool) else mode
    if mode not in DIRECT_MODES:
        raise ValueError(f"direct_io must be one of {DIRECT_MODES} (or True/False), not {mode!r}")
    if not hasattr(os, "O_DIRECT"):
        return False, "O_DIRECT is not available on this system: page cache"
    if mode != "auto":
        return mode == "always", f"direct_io={mode!r}"
    gib = split_bytes / 2**30
    if available is None:
        return True, f"{gib:.1f} GiB to read, available memory unknown: O_DIRECT"
    fits = split_bytes <= available // 2
    if fits and passes >= 2:
        return False, (f"{gib:.1f} GiB to read {passes:.1f} times, within half of {available / 2**30:.1f} GiB "
                       "available: page cache")
    why = f"more than half of {available / 2**30:.1f} GiB available" if not fits else \
        f"read {passes:.1f} times (under 2)"
    return True, f"{gib:.1f} GiB to read, {why}: O_DIRECT"


class ZarrReader:
    """Chunks decoded by zarr, straight into the window-buffer slot (zarr's `out=`)."""

    name = "zarr"

    def __init__(self, arr: S.ActivationArray, verify: bool = True):
        from zarr.core.buffer import default_buffer_prototype

        self.arr, self.verify = arr, verify
        self._nd = default_buffer_prototype().nd_buffer

    def read(self, chunk: int, lo: int, hi: int, dest: np.ndarray, scratch) -> int | None:
        """Fill `dest` (contiguous) with the chunk; returns its CRC-32 (None: not verifying)."""
        try:
            self.arr.array.get_basic_selection(slice(lo, hi), out=self._nd.from_numpy_array(dest))
        except Exception as e:  # noqa: BLE001 - a damaged shard fails inside zarr's codecs
            what = f"could not be read ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
            if S.is_connection_error(e):
                raise S.StoreError(f"{where(self.arr)}: chunk {chunk} (rows {lo}-{hi}) {what}: the store "
                                   "is unreachable. Once it is reachable again, continue with "
                                   "`mdiff train <config> --resume`") from e
            raise S.corrupt_chunk(self.arr, chunk, lo, hi, what) from e
        return S.crc32(memoryview(dest).cast("B")) if self.verify else None


class ShardFileReader(S.ShardFiles):
    """Inner chunks read straight from the shard files (uncompressed, local stores) into their slot:
    what the page cache holds first, the rest buffered or with O_DIRECT (`direct`)."""

    name = "mmap"

    def __init__(self, arr: S.ActivationArray, crcs: list[int], direct: bool = False, verify: bool = True):
        why = S.shard_files_unsupported(arr)
        if why:
            raise ValueError(f"reader 'mmap' cannot read {where(arr)}: {why}; use reader 'zarr' or 'auto'")
        super().__init__(arr)
        self.crcs, self.verify = crcs, verify
        self.direct = bool(direct) and hasattr(os, "O_DIRECT")
        self._zero_crc: dict[int, int] = {}

    def read(self, chunk: int, lo: int, hi: int, dest: np.ndarray, scratch) -> int | None:
        """Fill `dest` (contiguous) with the chunk; returns its CRC-32 (None: not verifying)."""
        location = self.chunk_location(chunk)
        nbytes = (hi - lo) * self.row_bytes
        if location is None:
            # zarr skips chunks equal to the fill value (0): legitimate iff that is what was written
            zero = self._zero_crc.get(nbytes)
            if zero is None:
                zero = self._zero_crc[nbytes] = S.crc32(bytes(nbytes))
            if self.crcs[chunk] != zero:
                raise self._bad(chunk, lo, hi, "is missing from its shard file, but was recorded "
                                "with non-zero data")
            dest[...] = 0
            return zero if self.verify else None
        shard, offset, stored = location
        if stored != self.chunk_bytes:
            raise self._bad(chunk, lo, hi, f"has {stored} stored bytes, expected {self.chunk_bytes} "
                            "(an uncompressed chunk)")
        view = memoryview(dest).cast("B")
        where_ = (chunk, lo, hi)
        fd = self.open(shard)
        try:
            if self.direct and page_cache_holds(fd, offset, nbytes) is not True:
                crc = self._read_direct(shard, view, offset, dest, scratch, where_)
                if crc is not False:
                    return crc
            return self._pieces(fd, view, offset, where_)
        finally:
            os.close(fd)

    def _pieces(self, fd: int, view: memoryview, offset: int, where_) -> int | None:
        """Buffered reads of `view` in pieces, each checksummed while it is in the CPU cache."""
        crc = 0
        for pos in range(0, len(view), PIECE):
            piece = view[pos:pos + PIECE]
            self.read_at(fd, piece, offset + pos, where_)
            if self.verify:
                crc = S.crc32(piece, crc)
        return crc if self.verify else None

    def _read_direct(self, shard: int, view: memoryview, offset: int, dest: np.ndarray, scratch,
                     where_) -> int | None | bool:
        """The chunk read with O_DIRECT, and its CRC-32 (None: not verifying); False where O_DIRECT
        cannot take this read (then it is read buffered).

        O_DIRECT wants offset, length and memory in whole blocks: a slot of whole blocks is read in
        place, a partial last chunk through the (page-aligned) scratch buffer."""
        nbytes = len(view)
        length = -(-nbytes // _DIRECT_ALIGN) * _DIRECT_ALIGN
        in_place = length == nbytes
        if offset % _DIRECT_ALIGN or dest.ctypes.data % _DIRECT_ALIGN or length > self.chunk_bytes:
            return False
        target = view if in_place else memoryview(scratch(self.arr.chunk_rows)).cast("B")[:length]
        try:
            fd = self.open(shard, os.O_DIRECT)
            try:
                pos = 0
                while pos < nbytes:  # the rounded-up tail may lie past the end of the file
                    got = os.preadv(fd, [target[pos:]], offset + pos)
                    if got <= 0:
                        raise self._bad(*where_, "is truncated")
                    pos += got
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.direct = False  # this filesystem refuses O_DIRECT: buffered from now on
            return False
        if not in_place:
            view[:] = target[:nbytes]
        return S.crc32(view) if self.verify else None


def open_readers(arrays: list[S.ActivationArray], reader: str, verify: bool, direct: bool
                 ) -> tuple[list[list[int] | None], list]:
    """(recorded checksums, reader) per array: per array, so "auto" can mix local uncompressed
    and other arrays. Checksums are loaded where the reader or `verify` needs them."""
    crcs: list[list[int] | None] = [None] * len(arrays)
    readers = []
    for i, arr in enumerate(arrays):
        use_shards = reader == "mmap" or (reader == "auto" and S.shard_files_unsupported(arr) is None)
        if use_shards or verify:
            crcs[i] = arr.complete_checksums()
        readers.append(ShardFileReader(arr, crcs[i], direct=direct, verify=verify) if use_shards
                       else ZarrReader(arr, verify=verify))
    return crcs, readers
