"""The store on its own: arrays, completion records, checksums, formats, fsspec roots."""

import json
import uuid

import numpy as np
import pytest
import torch

from pipeline import store as S


def _root(tmp_path, kind):
    if kind == "local":
        return S.StoreRoot(str(tmp_path / "store"))
    return S.StoreRoot(f"memory://mdiff-test-{uuid.uuid4().hex}")


def _array(root, n_rows=1000, d=8, chunk=64, shard=256, dtype="bfloat16", compression="none"):
    return S.create_activation_array(
        root, S.activation_path("ts-x", "m-0", "layer1.resid_post"), n_rows=n_rows, d_model=d,
        chunk_rows=chunk, shard_rows=shard, storage_dtype=dtype, compression=compression,
        attrs={"scale": 0.5, "produced_by": {"config": "exp.toml"}},
    )


def _data(arr, shard, dtype="bfloat16"):
    start, stop = arr.shard_rows_range(shard)
    x = torch.randn(stop - start, arr.d_model, generator=torch.Generator().manual_seed(shard))
    return S.encode(x, dtype)


@pytest.mark.parametrize("kind", ["local", "memory"])
@pytest.mark.parametrize("dtype,compression", [("bfloat16", "none"), ("float32", "zstd")])
def test_roundtrip_and_completion(tmp_path, kind, dtype, compression):
    root = _root(tmp_path, kind)
    root.ensure_format(create=True)
    arr = _array(root, dtype=dtype, compression=compression)
    assert arr.n_shards == 4 and not arr.is_complete()
    written = {}
    for shard in [2, 0, 3]:
        written[shard] = _data(arr, shard, dtype)
        arr.write_shard(shard, written[shard])
    assert arr.done_shards() == {0, 2, 3}
    assert not arr.finalize()
    with pytest.raises(S.IncompleteError) as e:
        S.open_activation_array(root, arr.path, require_complete=True)
    msg = str(e.value)
    assert "3/4 shards" in msg and "256 of 1,000 token rows missing" in msg
    assert "mdiff cache exp.toml" in msg
    written[1] = _data(arr, 1, dtype)
    arr.write_shard(1, written[1])
    assert arr.finalize() and arr.is_complete()
    arr2 = S.open_activation_array(root, arr.path, require_complete=True)
    full = np.concatenate([written[s] for s in range(4)])
    got = S.read_rows(arr2, 0, 1000)
    assert torch.equal(got, S.decode(full, dtype))
    assert S.verify_array(arr2) == []
    assert len(arr2.chunk_checksums()) == -(-1000 // 64)
    assert S.list_activation_arrays(root) == [arr.path]


def test_bfloat16_bits_roundtrip():
    x = torch.randn(50, 7) * 1e4
    a = S.encode(x, "bfloat16")
    assert a.dtype == np.uint16
    assert torch.equal(S.decode(a, "bfloat16"), x.to(torch.bfloat16))
    # the documented numpy-only recipe gives the same floats
    f = (a.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(f, x.to(torch.bfloat16).float().numpy())


def test_verify_names_corrupted_chunk(tmp_path):
    root = _root(tmp_path, "local")
    arr = _array(root)
    for s in range(arr.n_shards):
        arr.write_shard(s, _data(arr, s))
    assert arr.finalize()
    # flip bytes inside shard 1's first inner chunk (uncompressed: data sits at the file start)
    shard_file = tmp_path / "store" / arr.path / "c" / "1" / "0"
    raw = bytearray(shard_file.read_bytes())
    raw[100:110] = bytes(10)
    shard_file.write_bytes(bytes(raw))
    bad = S.verify_array(arr)
    assert [(b.chunk, b.rows) for b in bad] == [(4, (256, 320))]
    assert "checksum" in bad[0].reason
    # truncating the file makes it undecodable: reported, not raised
    shard_file.write_bytes(bytes(raw[:50]))
    bad = S.verify_array(arr)
    assert {b.chunk for b in bad} >= {4} and all(b.rows[0] >= 256 and b.rows[1] <= 512 for b in bad)


def test_existing_array_with_other_structure_is_refused(tmp_path):
    root = _root(tmp_path, "local")
    _array(root)
    with pytest.raises(S.StoreMismatchError, match="chunk_rows: stored 64, asked 128"):
        _array(root, chunk=128)
    # same structure: opened, and the stored scale wins over a new one
    arr = S.create_activation_array(
        root, S.activation_path("ts-x", "m-0", "layer1.resid_post"), n_rows=1000, d_model=8,
        chunk_rows=64, shard_rows=256, storage_dtype="bfloat16", compression="none",
        attrs={"scale": 9.0})
    assert arr.scale == 0.5


def test_newer_format_refused(tmp_path):
    root = _root(tmp_path, "local")
    root.write_json("mdiff.json", {"format": S.FORMAT, "version": S.FORMAT_VERSION + 1})
    with pytest.raises(S.StoreFormatError, match="upgrade mdiff"):
        root.ensure_format(create=True)
    arr = _array(_root(tmp_path / "b", "local"))
    meta_path = tmp_path / "b" / "store" / arr.path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(S.StoreFormatError, match="format 99"):
        S.open_activation_array(arr.root, arr.path)


def test_token_set_written_idempotently(tmp_path):
    root = _root(tmp_path, "local")
    toks = np.arange(40 * 16, dtype=np.int32).reshape(40, 16)
    src = (np.arange(40) % 3).astype(np.uint8)
    blocks = lambda: [(toks[i:i + 7], src[i:i + 7]) for i in range(0, 40, 7)]  # noqa: E731
    with pytest.raises(S.IncompleteError, match="missing or incomplete"):
        S.open_token_set(root, "ts-abc")
    ts = S.write_token_set(root, "ts-abc", 40, 16, blocks(), {"n_train_sequences": 36})
    assert np.array_equal(ts.tokens[:], toks) and np.array_equal(ts.source[:], src)
    assert ts.n_train_sequences == 36
    ts2 = S.write_token_set(root, "ts-abc", 40, 16, blocks(), {"n_train_sequences": 36})
    assert np.array_equal(ts2.tokens[:], toks)
    assert S.list_token_sets(root) == ["ts-abc"]
    with pytest.raises(S.StoreError, match="got 7 sequences, expected 40"):
        S.write_token_set(root, "ts-short", 40, 16, blocks()[:1], {})
    assert not S.token_set_complete(root, "ts-short")


def test_token_set_metadata_is_final_from_the_first_write(tmp_path):
    """zarr's create_group checks, then writes: a second job can rewrite the group's metadata after
    the first has completed. Both must then write the same attributes, so they are written with
    the group, before any token, not only at the end."""
    root = _root(tmp_path, "local")
    toks = np.zeros((8, 4), np.int32)
    seen = []

    def blocks():
        meta = json.loads((tmp_path / "store" / S.tokenset_path("ts-x") / "zarr.json").read_text())
        seen.append(meta["attributes"])
        yield toks, np.zeros(8, np.uint8)

    S.write_token_set(root, "ts-x", 8, 4, blocks(), {"n_train_sequences": 7})
    assert seen and seen[0].get("n_train_sequences") == 7 and "format_version" in seen[0]


def test_stale_partials_removed_only_when_old(tmp_path):
    import os
    import time

    root = _root(tmp_path, "local")
    arr = _array(root)
    arr.write_shard(0, _data(arr, 0))
    cdir = tmp_path / "store" / arr.path / "c" / "1"
    cdir.mkdir(parents=True)
    old, fresh = cdir / "0.abc.partial", cdir / "0.def.partial"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert arr.remove_stale_partials() == 1
    assert not old.exists() and fresh.exists()
