"""`mdiff cache CONFIG --repair`: recompute the damaged chunks of recorded shards from the models.

A chunk can go bad after it was recorded (a failing disk, a stray write, a truncated copy).
Every chunk's CRC-32 was recorded when it was written and the job is deterministic, so a bad
chunk is recomputed and checked against that record before anything is replaced. The good
chunks of the same shard are kept exactly as stored, other shards are not touched, and a chunk
whose recomputation does not match its record (a cache made on another kind of device, or a
damaged token set) is reported and left alone.
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from pipeline.config import CacheExperiment as ExperimentConfig
from pipeline.config import HookSpec, ModelSpec

from . import experiment as E
from . import models as M
from . import store as S
from .cache import compute_shard


@dataclass
class RepairedShard:
    path: str
    shard: int
    chunks: list[int]  # the chunks that were bad and now hold their recorded bytes


@dataclass
class RepairReport:
    arrays_checked: int = 0
    repaired: list[RepairedShard] = field(default_factory=list)
    unrepairable: list[S.BadChunk] = field(default_factory=list)


def _stored_arrays(root: S.StoreRoot, ts_id: str, spec: ModelSpec, hooks: list[HookSpec]):
    """(compute dtype, {hook: array}) for every compute dtype this model has arrays of: with
    dtype "auto" a cache made on a GPU (bfloat16) sits beside one made on a CPU (float32)."""
    dtypes = ("bfloat16", "float32") if spec.dtype == "auto" else (spec.dtype,)
    for dtype in dtypes:
        key = M.model_key(M.model_identity(spec, dtype))
        paths = {h: S.activation_path(ts_id, key, h.label) for h in hooks}
        found = {h: S.open_activation_array(root, p) for h, p in paths.items() if S.array_exists(root, p)}
        if found:
            yield dtype, found


def _repair_shard(arr: S.ActivationArray, shard: int, fresh, bad: list[S.BadChunk],
                  recorded: dict[int, int], report: RepairReport) -> None:
    """Write `shard` with the recomputed bad chunks and the stored good ones, if every bad chunk's
    recomputation matches its record; otherwise write nothing and report those chunks."""
    start, stop = arr.shard_rows_range(shard)
    cr = arr.chunk_rows
    bad_chunks = {b.chunk for b in bad}
    data = fresh.copy()
    mismatched = []
    for c in range(start // cr, -(-stop // cr)):
        lo, hi = c * cr, min(c * cr + cr, stop)
        if c in bad_chunks:
            if S.checksum(data[lo - start:hi - start]) != recorded[c]:
                mismatched.append(c)
        else:
            data[lo - start:hi - start] = arr.array[lo:hi]  # verified good: keep the stored bytes
    if mismatched:
        for b in bad:
            if b.chunk in mismatched:
                report.unrepairable.append(dataclasses.replace(b, reason=(
                    f"{b.reason}; recomputing it gave other values than were recorded (was it "
                    f"cached on another kind of device? repair there, or delete the array and "
                    f"rerun mdiff cache)")))
        return
    arr.write_shard(shard, data, writer=f"{socket.gethostname()}:repair")
    report.repaired.append(RepairedShard(arr.path, shard, sorted(bad_chunks)))


def repair_store(cfg: ExperimentConfig, log=print, progress: bool = True) -> RepairReport:
    """Verify every array of the experiment's models and repair the bad chunks of recorded shards.

    Shards that were never recorded are not this function's business: the cache job writes them.
    """
    report = RepairReport()
    root = S.StoreRoot(cfg.store, cfg.storage_options)
    root.ensure_format(create=False)
    ref = E.resolve_token_set(cfg)
    if not S.token_set_complete(root, ref.id):
        log(f"repair: token set {ref.id} is not in {root.url} yet; nothing to repair")
        return report
    ts = S.open_token_set(root, ref.id)
    for spec in cfg.models:
        for dtype, arrays in _stored_arrays(root, ref.id, spec, cfg.hooks):
            bad_by_shard: dict[int, dict[HookSpec, list[S.BadChunk]]] = {}
            for h, arr in arrays.items():
                with tqdm(total=arr.n_rows, unit="row", unit_scale=True, disable=not progress,
                          desc=f"verify {spec.name} {h.label}") as bar:
                    bad = S.verify_array(arr, progress=bar)
                report.arrays_checked += 1
                for b in bad:
                    bad_by_shard.setdefault(b.chunk * arr.chunk_rows // arr.shard_rows, {}) \
                        .setdefault(h, []).append(b)
            if not bad_by_shard:
                continue
            n_bad = sum(len(b) for hooks in bad_by_shard.values() for b in hooks.values())
            log(f"{spec.name}: {n_bad} bad chunk(s) in {len(bad_by_shard)} shard(s); recomputing them")
            device = M.resolve_device(spec.device)
            lm = M.load_model(dataclasses.replace(spec, dtype=dtype), device=device)
            recorded = {h: S.recorded_checksums(arr) for h, arr in arrays.items()}
            for shard, by_hook in sorted(bad_by_shard.items()):
                fresh = compute_shard(lm, ts, {h: arrays[h] for h in by_hook}, shard, cfg.cache,
                                      device)
                for h, bad in by_hook.items():
                    _repair_shard(arrays[h], shard, fresh[h], bad, recorded[h], report)
            known = {(b.path, b.chunk) for b in report.unrepairable}
            for h in {h for by_hook in bad_by_shard.values() for h in by_hook}:
                for b in S.verify_array(arrays[h]):  # what the rewrite should have fixed
                    if (b.path, b.chunk) not in known:
                        report.unrepairable.append(b)
    return report
