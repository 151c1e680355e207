"""Faults made to happen for real: kill -9 during training, a full disk (a byte budget on the
store, and a real size-limited tmpfs), damaged chunks on disk, and readers beside writers.

Each test ends where a user would: the error says what happened and what to do, nothing
unwritten is recorded as written, and rerunning ends byte-identical to an undisturbed run.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import zarr

from mdiff.cli import main as cli_main
from mdiff.config import load_config
from pipeline import store as S
from pipeline.cache import run_cache
from tests.reliability.fault_kit import (
    Forkserver,
    Kit,
    data_files,
    reference_files,
    snapshot,
    train_sweep,
)
from trainer import checkpoint as ckpt
from trainer import train as T
from trainer.loader import ActivationLoader, CorruptChunkError

SILENT = dict(log=lambda *a: None, progress=False)


def _outputs(out: Path) -> dict[str, object]:
    """What a training run leaves for its users: weights, metrics, and config.json without the
    one entry that names the output folder itself."""
    got: dict[str, object] = {"metrics.jsonl": (out / "metrics.jsonl").read_text()}
    for d in sorted(p for p in out.iterdir() if (p / "dictionary.safetensors").exists()):
        got[f"{d.name}/dictionary.safetensors"] = (d / "dictionary.safetensors").read_bytes()
        meta = json.loads((d / "config.json").read_text())
        meta["train"].pop("out_dir")
        got[f"{d.name}/config.json"] = meta
    return got


@pytest.fixture(scope="module")
def trained(kit: Kit) -> dict:
    """An uninterrupted training run on the reference store: what every interrupted one must equal."""
    cfg = kit.config(kit.dir / "train-ref" / "exp.toml", store=kit.ref_store, train=train_sweep())
    report = T.run_train(load_config(cfg), **SILENT)
    return _outputs(report.out_dir)


# -- kill -9 during training ------------------------------------------------------------------------
def _latest_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def test_training_killed_at_random_points_resumes_bit_identical(kit: Kit, trained: dict,
                                                                forkserver: Forkserver, tmp_path):
    cfg = kit.config(tmp_path / "exp.toml", store=kit.ref_store, train=train_sweep())
    out = tmp_path / "runs" / "exp"
    rng = random.Random(20261121)
    kills = []
    for i, target in enumerate((10, 20, 30)):
        # kill -9 a few ms (at random) after the checkpoint of step `target` exists: the run is
        # then training, writing metrics, or writing its next checkpoint
        args = ["train", str(cfg), "--no-progress"] + (["--resume"] if i else [])
        pid = forkserver.start(*args, log=tmp_path / f"run{i}.log")
        while (rc := forkserver.wait(pid, block=False)) is None and _latest_step(out) < target:
            time.sleep(0.002)
        if rc is None:
            time.sleep(rng.uniform(0, 0.015))
            os.kill(pid, signal.SIGKILL)
            rc = forkserver.wait(pid)
        kills.append((target, rc, _latest_step(out)))
    assert all(rc == -signal.SIGKILL and target <= step < 40 for target, rc, step in kills), kills
    report = T.run_train(load_config(cfg), resume=True, **SILENT)
    assert report.resumed_from == kills[-1][2]
    assert _outputs(out) == trained


def test_checkpoint_write_failure_keeps_the_previous_one(tmp_path, monkeypatch):
    """A checkpoint write that fails half-way (here the optimizer file hits ENOSPC with 2000 of
    its bytes on disk) leaves no folder that --resume could mistake for a checkpoint."""
    d = tmp_path / "checkpoints"
    parts = {"a": {"tensors": {"dictionary": {"w": torch.arange(1000.0)},
                               "optimizer": {"m": torch.ones(1000)}}, "json": {"x": 1}}}
    ckpt.save_checkpoint(d, 5, parts, {"loader": {"batch": 5}})
    real = ckpt.save_file

    def fills_the_disk(tensors, path):
        if "optimizer" in path:
            real(tensors, path)
            Path(path).write_bytes(Path(path).read_bytes()[:2000])  # what reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", fills_the_disk)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.save_checkpoint(d, 10, parts, {"loader": {"batch": 10}})
    message = str(e.value)
    for part in ("step 10", "no space left", "step_000000005", "--resume", "KiB"):
        assert part in message, (part, message)
    assert sorted(p.name for p in d.iterdir()) == ["latest.json", "step_000000005"]
    latest = ckpt.latest_checkpoint(d)
    assert latest.name == "step_000000005" and ckpt.trainer_state(latest)["loader"] == {"batch": 5}
    tensors, meta = ckpt.load_part(latest, "a")
    assert torch.equal(tensors["optimizer"]["m"], torch.ones(1000)) and meta == {"x": 1}


# -- a full disk ------------------------------------------------------------------------------------
def _filling_up(store, budget: int):
    """The store's device, filling up: writes succeed until `budget` bytes, then fail with ENOSPC
    (zarr re-wraps a store with `type(self)(store=...)`, so the budget lives in the closure)."""
    left = [budget]

    class FullAfter(zarr.storage.WrapperStore):
        async def set(self, key, value, *args, **kwargs):
            left[0] -= len(value)
            if left[0] < 0:
                raise OSError(errno.ENOSPC, "No space left on device", key)
            return await self._store.set(key, value, *args, **kwargs)

    return FullAfter(store)


BUDGET = 70_000  # bytes the store takes: the token set and a few of the 8 activation shards of 16 KiB


def test_cache_stops_clearly_when_the_store_fills_and_resumes_identically(kit: Kit, tmp_path,
                                                                         monkeypatch):
    cfg = kit.config(tmp_path / "exp.toml", store=tmp_path / "store", models=("llama-s0",),
                     hooks=((1, "resid_post"),))
    real = S.StoreRoot.zarr_store

    def limited(self):
        if self._zarr_store is None:
            self._zarr_store = _filling_up(real(self), budget=BUDGET)
        return self._zarr_store

    monkeypatch.setattr(S.StoreRoot, "zarr_store", limited)
    with pytest.raises(S.StoreFullError) as e:
        run_cache(load_config(cfg), **SILENT)
    message = str(e.value)
    for part in ("no space left", "activations/ts-", "layer1.resid_post (needs 16.0 KiB",
                 "llama-s0 still needs about", "unrecorded shard(s)", f"Rerun: mdiff cache {cfg}"):
        assert part in message, (part, message)
    monkeypatch.setattr(S.StoreRoot, "zarr_store", real)

    root = S.StoreRoot(str(tmp_path / "store"))
    time.sleep(0.2)  # zarr's pool may still finish writes handed to it before the error
    arrays = [S.open_activation_array(root, p) for p in S.list_activation_arrays(root)]
    recorded = sum(len(a.done_shards()) for a in arrays)
    assert 0 < recorded < 8 and not any(a.is_complete() for a in arrays)
    for a in arrays:  # every record is backed by its data
        assert S.verify_array(a) == [], a.path
    assert not list((tmp_path / "store").rglob("*.tmp"))

    report = run_cache(load_config(cfg), **SILENT)  # space freed
    assert report.models[0].hooks["layer1.resid_post"].shards_written == 8 - recorded
    assert data_files(tmp_path / "store") == reference_files(kit)


def test_real_full_disk_for_the_cache_and_for_checkpoints(kit: Kit, trained: dict,
                                                         forkserver: Forkserver, tmp_path):
    """A size-limited tmpfs in a private mount namespace: the disk really fills. The cache job
    and training both stop with a clear message, leave nothing half-written that counts, and
    finish identically once the tmpfs is enlarged."""
    if not forkserver.private_mounts:
        pytest.skip("needs `unshare -Urm` to mount a private tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "out"  # what the tmpfs held, copied out (it is visible only to the children)
    out.mkdir()

    # the cache job: one array (token set ~40 KiB of pages, then ~24 KiB per shard) on 100 KiB
    cache_cfg = kit.config(tmp_path / "cache.toml", store=mnt / "store", models=("llama-s0",),
                           hooks=((1, "resid_post"),))
    forkserver.sh("mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mnt))
    assert forkserver.run("cache", str(cache_cfg), "--no-progress", log=tmp_path / "cache1.log") == 2
    err = (tmp_path / "cache1.log").read_text()
    assert "Traceback" not in err, err
    for part in ("no space left on the store's device", "activations/ts-", "still needs about",
                 f"Rerun: mdiff cache {cache_cfg}"):
        assert part in err, (part, err)
    forkserver.sh("cp", "-a", str(mnt / "store"), str(out / "store-when-full"))
    root = S.StoreRoot(str(out / "store-when-full"))
    arrays = [S.open_activation_array(root, p) for p in S.list_activation_arrays(root)]
    assert arrays and not any(a.is_complete() for a in arrays)
    for a in arrays:  # every record is backed by its data
        assert S.verify_array(a) == [], a.path
    forkserver.sh("mount", "-o", "remount,size=16m", str(mnt))
    assert forkserver.run("cache", str(cache_cfg), "--no-progress", log=tmp_path / "cache2.log") == 0
    forkserver.sh("cp", "-a", str(mnt / "store"), str(out / "store"))
    forkserver.sh("umount", str(mnt))
    assert data_files(out / "store") == reference_files(kit)

    # training: checkpoints of ~200 KiB on 400 KiB; the failed one is gone, the latest is whole
    train_cfg = kit.config(tmp_path / "train.toml", store=kit.ref_store,
                           train=train_sweep(extra={"out_dir": f"{mnt}/runs/exp"}))
    forkserver.sh("mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt))
    assert forkserver.run("train", str(train_cfg), "--no-progress", log=tmp_path / "train1.log") == 2
    err = (tmp_path / "train1.log").read_text()
    assert "Traceback" not in err and "no space left on the device" in err and "--resume" in err, err
    forkserver.sh("cp", "-a", str(mnt / "runs"), str(out / "runs-when-full"))
    checkpoints = out / "runs-when-full" / "exp" / "checkpoints"
    assert not list(checkpoints.glob(".*"))  # no temporary folder or file left behind
    latest = ckpt.latest_checkpoint(checkpoints)
    assert latest is not None and 0 < ckpt.trainer_state(latest)["step"] < 40
    for name in ("btk", "relu"):
        tensors, _ = ckpt.load_part(latest, name)
        assert set(tensors) == {"dictionary", "optimizer", "counters", "sums", "variants"}
    forkserver.sh("mount", "-o", "remount,size=16m", str(mnt))
    assert forkserver.run("train", str(train_cfg), "--no-progress", "--resume",
                          log=tmp_path / "train2.log") == 0
    forkserver.sh("cp", "-a", str(mnt / "runs"), str(out / "runs"))
    forkserver.sh("umount", str(mnt))
    assert _outputs(out / "runs" / "exp") == trained


# -- damaged chunks on disk -------------------------------------------------------------------------
def _arrays(store: Path) -> dict[str, S.ActivationArray]:
    """The store's arrays keyed '<model>/<hook>', e.g. 'llama-s0/layer1.resid_post'."""
    root = S.StoreRoot(str(store))
    out = {}
    for p in S.list_activation_arrays(root):
        _, _, key, hook = p.split("/")
        out[f"{key.rsplit('-', 1)[0]}/{hook}"] = S.open_activation_array(root, p, require_complete=True)
    return out


def _shard_file(arr: S.ActivationArray, shard: int) -> Path:
    return Path(arr.root.base) / arr.path / "c" / str(shard) / "0"


def _damage(kit: Kit, tmp_path: Path) -> tuple[Path, Path, dict]:
    """A copy of the reference store with one flipped chunk (llama-s0 layer1, chunk 5 in shard 1)
    and one truncated shard file (llama-s1 layer2, shard 2: its chunks 8-11)."""
    store = kit.store_copy(tmp_path / "store")
    cfg = kit.config(tmp_path / "exp.toml", store=store, train=train_sweep(steps=10))
    arrays = _arrays(store)
    flipped, cut = arrays["llama-s0/layer1.resid_post"], arrays["llama-s1/layer2.resid_pre"]
    path = _shard_file(flipped, 1)
    raw = bytearray(path.read_bytes())
    raw[64 * 32 * 2 + 100] ^= 0xFF  # chunk 1 of the shard = chunk 5 of the array (no compression)
    path.write_bytes(bytes(raw))
    path = _shard_file(cut, 2)
    path.write_bytes(path.read_bytes()[:5000])
    return store, cfg, arrays


def test_damaged_chunks_are_named_refused_by_training_and_repaired(kit: Kit, tmp_path, capsys):
    store, cfg, arrays = _damage(kit, tmp_path)
    flipped, cut = arrays["llama-s0/layer1.resid_post"], arrays["llama-s1/layer2.resid_pre"]

    assert cli_main(["verify", str(cfg), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"BAD {flipped.path} chunk 5 rows 320-384: checksum" in out
    assert all(f"BAD {cut.path} chunk {c} " in out for c in range(8, 12))
    assert "verified 4 array(s): 5 bad chunk(s)" in out

    # the loader checks every chunk it reads, whichever reader: training stops, loudly
    ts = S.open_token_set(flipped.root, flipped.attrs["tokenset_id"])
    layer1 = [flipped, arrays["llama-s1/layer1.resid_post"]]
    for reader in ("mmap", "zarr"):
        with ActivationLoader(layer1, ts, split="train", batch_size=64, buffer_tokens=256,
                              reader=reader) as ld, pytest.raises(CorruptChunkError) as e:
            for _ in zip(range(ld.batches_per_epoch), ld):
                pass
        assert f"{flipped.path}: chunk 5 (rows 320-384)" in str(e.value)
        assert f"mdiff cache {flipped.attrs['produced_by']['config']} --repair" in str(e.value)
    layer2 = [arrays["llama-s0/layer2.resid_pre"], cut]
    for reader in ("mmap", "zarr"):
        with ActivationLoader(layer2, ts, split="train", batch_size=64, buffer_tokens=256,
                              reader=reader) as ld, pytest.raises(CorruptChunkError, match=cut.path):
            for _ in zip(range(ld.batches_per_epoch), ld):
                pass
    with pytest.raises(CorruptChunkError, match="chunk 5"):
        T.run_train(load_config(cfg), **SILENT)
    assert not list((tmp_path / "runs").rglob("dictionary.safetensors"))

    # repair rewrites the two damaged shards and nothing else
    untouched = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()
                 and p not in (_shard_file(flipped, 1), _shard_file(cut, 2)) and "_done" not in p.parts}
    assert cli_main(["cache", str(cfg), "--repair", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"rewrote {flipped.path} shard 1: chunk(s) 5" in out
    assert f"rewrote {cut.path} shard 2: chunk(s) 8, 9, 10, 11" in out
    assert "rewrote 2 shard(s), 0 chunk(s) not repaired" in out
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    assert data_files(store) == data_files(kit.ref_store)
    assert cli_main(["verify", str(cfg), "--no-progress"]) == 0


def test_repair_refuses_what_it_cannot_reproduce(kit: Kit, tmp_path, capsys):
    """A chunk whose recomputation does not match its record (here the record was altered) is
    reported and left as it is."""
    store = kit.store_copy(tmp_path / "store")
    cfg = kit.config(tmp_path / "exp.toml", store=store)
    arr = _arrays(store)["llama-s1/layer1.resid_post"]
    for rec_path in (f"{arr.path}/_done/00000003.json", f"{arr.path}/_complete.json"):
        rec = arr.root.read_json(rec_path)
        rec["chunk_crc32"][13 if "complete" in rec_path else 1] ^= 1
        arr.root.write_json(rec_path, rec)
    before = snapshot(store)
    assert cli_main(["cache", str(cfg), "--repair", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"NOT REPAIRED {arr.path} chunk 13 rows 832-896" in out
    assert "recomputing it gave other values than were recorded" in out
    assert snapshot(store) == before


# -- readers beside writers -------------------------------------------------------------------------
def test_training_reads_while_a_cache_job_writes_the_same_store(kit: Kit, forkserver: Forkserver,
                                                                tmp_path):
    """A cache job adds an array (another hook) to the store while a loader reads complete ones,
    and a writer keeps replacing the shard files being read with identical bytes: reads never
    see half a chunk (zarr renames whole files into place), and nothing is corrupted."""
    store = kit.store_copy(tmp_path / "store")
    cfg = kit.config(tmp_path / "more.toml", store=store, models=("llama-s0",),
                     hooks=((0, "resid_post"),))
    arrays = _arrays(store)
    layer1 = [arrays["llama-s0/layer1.resid_post"], arrays["llama-s1/layer1.resid_post"]]
    ts = S.open_token_set(layer1[0].root, layer1[0].attrs["tokenset_id"])

    def epoch(reader):
        with ActivationLoader(layer1, ts, split="train", batch_size=64, buffer_tokens=256,
                              reader=reader, read_threads=2) as ld:
            return [b.clone() for _, b in zip(range(ld.batches_per_epoch), ld)]

    expected = epoch("mmap")
    victim = layer1[1]
    shards = {s: victim.array[slice(*victim.shard_rows_range(s))] for s in range(victim.n_shards)}
    stop = threading.Event()

    def rewrite():
        while not stop.is_set():
            for s, data in shards.items():
                victim.write_shard(s, data, writer="rewriter")
                stop.wait(0.002)

    job = forkserver.start("cache", str(cfg), "--no-progress", log=tmp_path / "job.log")
    writer = threading.Thread(target=rewrite)
    writer.start()
    epochs, rc = 0, None
    try:
        while rc is None or epochs < 2:  # while the job runs, and at least two rounds
            for reader in ("mmap", "zarr"):
                got = epoch(reader)
                assert len(got) == len(expected)
                assert all(torch.equal(a, b) for a, b in zip(got, expected)), reader
            epochs += 1
            rc = rc if rc is not None else forkserver.wait(job, block=False)
    finally:
        stop.set()
        writer.join()
        rc = rc if rc is not None else forkserver.wait(job)
    assert rc == 0, (tmp_path / "job.log").read_text()[-2000:]
    after = _arrays(store)
    assert "llama-s0/layer0.resid_post" in after
    for arr in after.values():
        assert arr.is_complete() and S.verify_array(arr) == [], arr.path
    assert data_files(store) == {**data_files(store), **data_files(kit.ref_store)}
