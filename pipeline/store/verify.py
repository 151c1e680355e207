"""Finding damaged chunks: every chunk checked against the CRC-32 recorded when it was written.

Files can go bad after they were recorded complete (a failing disk, a stray write, a truncated
copy). `mdiff verify`, `mdiff cache --repair` and the loader all compare decoded chunks with the
recorded checksums, and all name a bad chunk the same way, with the commands that repair it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.store.arrays import ActivationArray
from pipeline.store.encoding import checksum
from pipeline.store.errors import CorruptChunkError


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
        rec = arr.shard_record(shard)
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


def corrupt_chunk(arr: ActivationArray, chunk: int, lo: int, hi: int, what: str) -> CorruptChunkError:
    """The error for a chunk of a complete array that reads back wrong (`what`: how), with the
    commands that find and recompute the damaged chunks."""
    config = (arr.attrs.get("produced_by") or {}).get("config") or "<config>"
    hint = (f"The array is recorded complete, so its files were damaged afterwards: "
            f"`mdiff verify {config}` lists the bad chunks and `mdiff cache {config} --repair` "
            f"recomputes only those.")
    return CorruptChunkError(f"{arr.root.url}/{arr.path}: chunk {chunk} (rows {lo}-{hi}) {what}. {hint}")
