"""The aligned, shuffled activation loader: alignment, splits, coverage, determinism, resume,
readers (shard files vs zarr), validation pass, refusals and checksums.

Stores are built directly with the store module. Row r of model m encodes (r, m) in its first
two columns (float32 values, or raw bfloat16 bits), so every batch row says where it came from.
Geometry: 44 sequences of 16 tokens (704 rows), 40 for training (rows 0-639); chunks of 48 rows
in shards of 192: chunk 13 straddles the train/validation boundary, the last shard and the last
chunk (rows 672-703) are partial.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import store as S
from trainer.loader import ActivationLoader, CorruptChunkError

CTX, N_SEQ, N_TRAIN, CHUNK, SHARD, D = 16, 44, 40, 48, 192, 6
T = N_TRAIN * CTX
HOOK = "layer1.resid_post"


def encode_rows(m: int, lo: int, hi: int, d: int, dtype: str, kind: str = "ids") -> np.ndarray:
    r = np.arange(lo, hi)[:, None]
    j = np.arange(d)[None, :]
    if kind == "random":
        rng = np.random.default_rng([m, lo])
        if dtype == "bfloat16":
            return rng.integers(0, 1 << 16, size=(hi - lo, d), dtype=np.uint16)
        return rng.standard_normal((hi - lo, d)).astype(np.float32)
    vals = np.where(j == 0, r, np.where(j == 1, m, (r * 7 + m * 13 + j) % 4000 + 1))
    return vals.astype(np.uint16 if dtype == "bfloat16" else np.float32)


def build(tmp_path, *, n_models=3, dtype="float32", compression="none", chunk=CHUNK, shard=SHARD,
          d=D, tokenset_id="ts-test", name="store", finalize=True, kind="ids", url=None,
          n_seq=N_SEQ, n_train=N_TRAIN, zero_chunks=()):
    root = S.StoreRoot(url or str(tmp_path / name))
    root.ensure_format(create=True)
    toks = np.zeros((n_seq, CTX), np.int32)
    ts = S.write_token_set(root, tokenset_id, n_seq, CTX, [(toks, np.zeros(n_seq, np.uint8))],
                           {"n_train_sequences": n_train, "context_length": CTX})
    arrays = []
    for m in range(n_models):
        arr = S.create_activation_array(
            root, S.activation_path(tokenset_id, f"model{m}-{dtype}-{chunk}-{d}", HOOK),
            n_rows=n_seq * CTX, d_model=d, chunk_rows=chunk, shard_rows=shard, storage_dtype=dtype,
            compression=compression,
            attrs={"scale": 1.0, "tokenset_id": tokenset_id, "context_length": CTX,
                   "hook": {"layer": 1, "site": "resid_post", "label": HOOK}})
        for s in range(arr.n_shards):
            lo, hi = arr.shard_rows_range(s)
            data = encode_rows(m, lo, hi, d, dtype, kind)
            for c in zero_chunks:
                a, b = max(c * chunk, lo), min((c + 1) * chunk, hi)
                if a < b:
                    data[a - lo:b - lo] = 0
            arr.write_shard(s, data)
        if finalize:
            assert arr.finalize()
        arrays.append(arr)
    return root, ts, arrays


def loader(arrays, ts, **kw):
    kw.setdefault("split", "train")
    kw.setdefault("batch_size", 40)
    kw.setdefault("buffer_tokens", 150)
    return ActivationLoader(arrays, ts, **kw)


def ids(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(row, model) encoded in each batch row: two [batch, n_models] arrays."""
    if batch.dtype == torch.bfloat16:
        x = batch.view(torch.int16).numpy().astype(np.int64)
    else:
        x = batch.numpy().astype(np.int64)
    return x[:, :, 0], x[:, :, 1]


def take(it, n):
    return [next(it) for _ in range(n)]


def raw(batch: torch.Tensor) -> torch.Tensor:
    """Bits, so that equality is bit-for-bit (bfloat16 NaN patterns included)."""
    return batch.view(torch.int16) if batch.dtype == torch.bfloat16 else batch.view(torch.int32)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(raw(x), raw(y)) for x, y in zip(a, b))


def usable(lo, hi, include_first=False):
    r = np.arange(lo, hi)
    return r if include_first else r[r % CTX != 0]


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    return build(tmp_path_factory.mktemp("f32"))


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return build(tmp_path_factory.mktemp("bf16"), dtype="bfloat16")


# -- alignment, splits, coverage ------------------------------------------------------------------
@pytest.mark.parametrize("store", ["f32", "bf16"])
@pytest.mark.parametrize("include_first", [False, True])
@pytest.mark.parametrize("reader", ["mmap", "zarr"])
def test_batches_aligned_train_only_and_cover_each_epoch(request, store, include_first, reader):
    _, ts, arrays = request.getfixturevalue(store)
    with loader(arrays, ts, include_first_position=include_first, reader=reader) as ld:
        assert ld.readers == (reader,) * 3
        assert (ld.n_models, ld.d_model) == (3, D)
        expected = usable(0, T, include_first)
        assert ld.rows_per_epoch == len(expected)
        assert ld.batches_per_epoch == len(expected) // 40
        it = iter(ld)
        for epoch in range(2):
            batches = take(it, ld.batches_per_epoch)
            for x in batches:
                assert x.shape == (40, 3, D) and x.dtype == ld.dtype and x.device.type == "cpu"
            rows, models = map(np.concatenate, zip(*map(ids, batches)))
            assert (models == np.arange(3)).all()
            assert (rows == rows[:, :1]).all(), "row i of a batch must be one token in every model"
            rows = rows[:, 0]
            assert rows.max() < T, "a validation row reached the training stream"
            assert include_first or (rows % CTX != 0).all()
            # the permutation covers the split: every usable train row once (minus a dropped tail)
            assert len(set(rows.tolist())) == len(rows)
            assert np.array_equal(rows, ld.epoch_rows(epoch))
            if len(expected) % 40 == 0:
                assert np.array_equal(np.sort(rows), expected)
        # other payload columns came along with their row (no mixing of rows inside a batch row)
        x = batches[-1]
        r, _ = ids(x)
        enc = np.stack([encode_rows(m, 0, T, D, ld.storage_dtype) for m in range(3)], 1)
        got = x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()
        assert np.array_equal(got, enc[r[:, 0]])


def test_epoch_order_follows_the_documented_design(f32):
    """Chunk permutation per epoch, windows of consecutive chunks, row permutation per window."""
    _, ts, arrays = f32
    ld = loader(arrays, ts, seed=5)
    k = ld.window_chunks
    assert k == 3  # round(150 / 48), and at least 2 + ceil(40 / 45) chunks
    n_chunks = math.ceil(T / CHUNK)
    for epoch in (0, 3):
        order = np.random.default_rng([5, epoch]).permutation(n_chunks)
        stream = []
        for w, start in enumerate(range(0, n_chunks, k)):
            rows = np.concatenate([usable(c * CHUNK, min((c + 1) * CHUNK, T)) for c in order[start:start + k]])
            stream.append(rows[np.random.default_rng([5, epoch, w]).permutation(len(rows))])
        assert np.array_equal(ld.epoch_rows(epoch), np.concatenate(stream)[:ld.batches_per_epoch * 40])
    assert not np.array_equal(ld.epoch_rows(0), ld.epoch_rows(1))


def test_deterministic_given_seed_whatever_the_threads(f32):
    _, ts, arrays = f32
    runs = []
    for threads, prefetch in [(1, 1), (4, 3)]:
        with loader(arrays, ts, seed=1, read_threads=threads, prefetch_batches=prefetch) as ld:
            runs.append(take(iter(ld), 40))  # 2.7 epochs, all held at once (no buffer reuse)
    assert same(runs[0], runs[1])
    with loader(arrays, ts, seed=2) as ld:
        other = take(iter(ld), 3)
    assert not same(runs[0][:3], other)


def test_iter_continues_the_stream_and_replaces_older_iterators(f32):
    _, ts, arrays = f32
    with loader(arrays, ts) as ref:
        expected = take(iter(ref), 6)
    with loader(arrays, ts) as ld:
        it1 = iter(ld)
        first = take(it1, 2)
        it2 = iter(ld)
        with pytest.raises(RuntimeError, match="replaced"):
            next(it1)
        rest = take(it2, 4)
    assert same(first + rest, expected)


# -- resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("store,more", [("f32", 5), ("bf16", 5), ("f32", 12)])  # 12: into epoch 2
def test_resume_gives_the_same_batches(request, store, more):
    _, ts, arrays = request.getfixturevalue(store)
    with loader(arrays, ts, seed=3) as ld:
        it = iter(ld)
        take(it, 7)
        state = json.loads(json.dumps(ld.state_dict()))
        assert (state["epoch"], state["batch"]) == (0, 7)
        uninterrupted = take(it, more)
    with loader(arrays, ts, seed=3, read_threads=1) as ld2:
        ld2.load_state_dict(state)
        resumed = take(iter(ld2), more)
        assert ld2.state_dict()["epoch"] == (7 + more) // ld2.batches_per_epoch
    assert same(resumed, uninterrupted)


def test_state_of_another_stream_refused(f32):
    _, ts, arrays = f32
    state = loader(arrays, ts).state_dict()
    with pytest.raises(ValueError, match="batch_size: saved 40, now 32"):
        loader(arrays, ts, batch_size=32).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        loader(arrays, ts, seed=9).load_state_dict(state)


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("reader", ["mmap", "zarr"])
def test_validation_pass_covers_exactly_the_validation_rows(f32, reader):
    _, ts, arrays = f32
    with loader(arrays, ts, split="validation", batch_size=25, reader=reader) as ld:
        expected = usable(T, N_SEQ * CTX)
        assert ld.rows_per_epoch == len(expected) == 60 and len(ld) == 3
        for _ in range(2):  # every iter() is a full pass
            batches = list(ld)
            assert [len(x) for x in batches] == [25, 25, 10]
            rows, models = map(np.concatenate, zip(*map(ids, batches)))
            assert (rows == rows[:, :1]).all() and (models == np.arange(3)).all()
            assert np.array_equal(rows[:, 0], expected)
        with pytest.raises(TypeError):
            len(loader(arrays, ts))  # the training stream is endless


def test_validation_split_can_be_empty(tmp_path):
    _, ts, arrays = build(tmp_path, n_models=1, n_train=N_SEQ)
    ld = loader(arrays, ts, split="validation")
    assert len(ld) == 0 and list(ld) == []


# -- readers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_shard_file_reader_matches_zarr_bit_for_bit(tmp_path, dtype):
    _, ts, arrays = build(tmp_path, n_models=2, dtype=dtype, kind="random", zero_chunks=(2,))
    truth = np.stack([a.array[:] for a in arrays], 1)
    for split, lo, hi in [("train", 0, T), ("validation", T, N_SEQ * CTX)]:
        got = {}
        for reader in ("mmap", "zarr"):
            with loader(arrays, ts, split=split, reader=reader, shuffle=False, batch_size=50,
                        include_first_position=True) as ld:
                got[reader] = torch.cat(list(ld))
        assert same([got["mmap"]], [got["zarr"]])
        np_got = got["mmap"].view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else got["mmap"].numpy()
        assert np.array_equal(np_got, truth[lo:hi])  # includes the partial last shard and chunk
    shuffled = {}
    for reader in ("mmap", "zarr"):
        with loader(arrays, ts, reader=reader, seed=4) as ld:
            shuffled[reader] = take(iter(ld), 20)
    assert same(shuffled["mmap"], shuffled["zarr"])


@pytest.mark.parametrize("dtype,d", [("bfloat16", 128), ("float32", D)])  # aligned / unaligned chunks
def test_direct_io_reads_the_same(tmp_path, dtype, d):
    _, ts, arrays = build(tmp_path, n_models=1, dtype=dtype, d=d, kind="random")
    got = {}
    for direct in (False, True):
        with loader(arrays, ts, reader="mmap", direct_io=direct, seed=2) as ld:
            got[direct] = take(iter(ld), 25)
            if direct and d == 128:
                assert ld._readers[0].direct  # O_DIRECT really used (the filesystem took it)
    assert same(got[False], got[True])


def test_auto_reader_choice(tmp_path, f32):
    _, ts, arrays = f32
    assert loader(arrays, ts).readers == ("mmap",) * 3
    _, zts, zarrays = build(tmp_path, n_models=2, compression="zstd", name="z")
    assert loader(zarrays, zts).readers == ("zarr", "zarr")
    with pytest.raises(ValueError, match="reader 'mmap' cannot read .*compressed"):
        loader(zarrays, zts, reader="mmap")
    _, mts, marrays = build(tmp_path, n_models=2, url="memory://mdiff-loader-test")
    with loader(marrays, mts, seed=7) as ld, loader(arrays[:2], ts, seed=7) as local:
        assert ld.readers == ("zarr", "zarr")
        assert same(take(iter(ld), 4), take(iter(local), 4))


# -- refusals -------------------------------------------------------------------------------------
def test_incompatible_arrays_refused(tmp_path, f32):
    _, ts, arrays = f32
    _, _, other_chunk = build(tmp_path, n_models=1, chunk=96, name="c")
    _, _, other_d = build(tmp_path, n_models=1, d=8, name="d")
    _, _, other_dtype = build(tmp_path, n_models=1, dtype="bfloat16", name="t")
    _, _, other_ts_arrays = build(tmp_path, n_models=1, tokenset_id="ts-other", name="o")
    cases = [(other_chunk, "chunk_rows"), (other_d, "equal d_model"), (other_dtype, "storage_dtype"),
             (other_ts_arrays, "tokenset_id")]
    for extra, field in cases:
        with pytest.raises(ValueError, match=field) as e:
            loader([arrays[0], extra[0]], ts)
        assert arrays[0].path in str(e.value) and extra[0].path in str(e.value)
    with pytest.raises(ValueError, match="cached on token set 'ts-other'"):
        loader(other_ts_arrays, ts)
    with pytest.raises(ValueError, match="fewer than one batch"):
        loader(arrays, ts, batch_size=10_000)


def test_incomplete_array_refused(tmp_path, f32):
    _, ts, arrays = f32
    root = arrays[0].root
    arr = S.create_activation_array(
        root, S.activation_path("ts-test", "unfinished", HOOK), n_rows=N_SEQ * CTX, d_model=D,
        chunk_rows=CHUNK, shard_rows=SHARD, storage_dtype="float32", compression="none",
        attrs={"scale": 1.0, "tokenset_id": "ts-test", "context_length": CTX,
               "hook": {"label": HOOK}})
    for s in range(arr.n_shards - 1):
        lo, hi = arr.shard_rows_range(s)
        arr.write_shard(s, encode_rows(0, lo, hi, D, "float32"))
    assert not arr.finalize()
    with pytest.raises(S.IncompleteError, match="incomplete: 3/4 shards"):
        loader([arrays[0], arr], ts)


# -- damaged files --------------------------------------------------------------------------------
def _shard_file(arr, shard):
    return arr.root.base + f"/{arr.path}/c/{shard}/0"


@pytest.mark.parametrize("reader", ["mmap", "zarr"])
def test_verify_names_a_corrupted_chunk(tmp_path, reader):
    _, ts, arrays = build(tmp_path, n_models=2)
    # chunk 5 = shard 1, inner chunk 1; uncompressed, so its bytes sit at the index's offset
    from trainer.readers import ShardFileReader
    offset = int(ShardFileReader(arrays[1], arrays[1].chunk_checksums()).index(1)[1, 0])
    path = Path(_shard_file(arrays[1], 1))
    data = bytearray(path.read_bytes())
    data[offset + 100:offset + 108] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with loader(arrays, ts, reader=reader, verify=True) as ld, pytest.raises(
            CorruptChunkError, match=r"model1.*chunk 5 \(rows 240-288\) fails its checksum"):
        take(iter(ld), ld.batches_per_epoch)
    with loader(arrays, ts, reader=reader, split="validation") as ld:  # other chunks still read
        assert len(list(ld)) == 2


def test_missing_chunk_raises_but_zero_chunk_reads_as_zeros(tmp_path):
    _, ts, arrays = build(tmp_path, n_models=2, zero_chunks=(9,))
    with loader(arrays, ts, reader="mmap", include_first_position=True, shuffle=False,
                batch_size=48) as ld:
        batches = list(ld)
    assert (batches[9] == 0).all() and (batches[8] != 0).any()  # chunk 9 (zeros, never stored)
    os.remove(_shard_file(arrays[0], 1))
    with loader(arrays, ts, reader="mmap") as ld, pytest.raises(
            CorruptChunkError, match=r"model0.*chunk [4-7] \(rows \d+-\d+\) is missing"):
        take(iter(ld), ld.batches_per_epoch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu(f32):
    _, ts, arrays = f32
    with loader(arrays, ts, device="cuda") as gpu, loader(arrays, ts) as cpu:
        g, c = take(iter(gpu), 20), take(iter(cpu), 20)
    assert all(x.is_cuda for x in g)
    assert same([x.cpu() for x in g], c)
