"""The loader's fast path: chunks read in place (page cache first, then buffered or O_DIRECT),
checksummed piece by piece in the read threads, gathered in parallel, converted to float32 in the
loader. Every batch is checked against the arrays' values read back through zarr and indexed with
the documented row order (`epoch_rows`), bit for bit.
"""

import errno
import os

import numpy as np
import pytest
import torch

import trainer.readers as R
from pipeline import store as S
from tests.trainer.test_loader import CTX, N_SEQ, T, build, loader, take
from trainer.loader import CorruptChunkError


def truth_rows(arrays, rows: np.ndarray) -> np.ndarray:
    """[len(rows), n_models, d] stored values (uint16 bits or float32) via zarr, the brute force."""
    full = np.stack([a.array[:] for a in arrays], 1)
    return full[rows]


def bits(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.view(torch.int32).numpy()


def bits_of(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def shard_paths(arrays):
    return [f"{a.root.base}/{a.path}/c/{s}/0" for a in arrays for s in range(a.n_shards)]


def evict(paths, offset: int = 0, length: int = 0):
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def first_page_cached(path: str) -> bool:
    """Whether the file's first page is in the page cache (a read that may not wait for the disk;
    on a miss it starts the kernel's readahead, so a second call may say yes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT) > 0
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def o_direct_supported(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise


@pytest.fixture(scope="module")
def bf16_random(tmp_path_factory):
    # d 128 bfloat16: 256-byte rows, 48-row chunks of 12 KiB, whole 4 KiB blocks (O_DIRECT in place)
    return build(tmp_path_factory.mktemp("bf16r"), n_models=2, dtype="bfloat16", d=128, kind="random")


@pytest.mark.parametrize("float32", [False, True])
@pytest.mark.parametrize("gather_threads", [1, 3])
def test_batches_are_the_stored_values_in_the_documented_order(bf16_random, float32, gather_threads):
    _, ts, arrays = bf16_random
    with loader(arrays, ts, seed=6, float32=float32, gather_threads=gather_threads) as ld:
        assert ld.dtype == (torch.float32 if float32 else torch.bfloat16)
        batches = take(iter(ld), ld.batches_per_epoch + 3)  # into the second epoch
        rows = np.concatenate([ld.epoch_rows(0), ld.epoch_rows(1)[:3 * 40]])
    want = truth_rows(arrays, rows)  # uint16 bits
    got = torch.cat(batches)
    assert got.dtype == ld.dtype and got.is_contiguous()
    if float32:
        # bfloat16 -> float32 is exact: the float32 bits are the bfloat16 bits shifted up 16
        assert np.array_equal(got.view(torch.int32).numpy().view(np.uint32), want.astype(np.uint32) << 16)
    else:
        assert np.array_equal(bits(got).view(np.uint16), want)


def test_float32_batches_equal_the_callers_float_and_are_recycled_safely(bf16_random):
    _, ts, arrays = bf16_random
    with loader(arrays, ts, seed=2) as ref, loader(arrays, ts, seed=2, float32=True, prefetch_batches=1) as ld:
        expected = [x.float() for x in take(iter(ref), 30)]
        held = take(iter(ld), 30)  # all held at once: the pool must not hand out a held buffer
    assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(held, expected))  # NaNs included
    assert len({x.data_ptr() for x in held}) == 30


def test_validation_pass_converts_the_final_partial_batch(bf16_random):
    _, ts, arrays = bf16_random
    with loader(arrays, ts, split="validation", batch_size=25, float32=True) as ld:
        batches = list(ld)
    assert [len(x) for x in batches] == [25, 25, 10]
    want = truth_rows(arrays, np.array([r for r in range(T, N_SEQ * CTX) if r % CTX]))
    assert np.array_equal(torch.cat(batches).view(torch.int32).numpy().view(np.uint32), want.astype(np.uint32) << 16)


@pytest.mark.parametrize("direct_io", ["never", "always"])
@pytest.mark.parametrize("cache", ["cold", "half", "warm"])
def test_page_cache_first_then_buffered_or_direct_reads_the_same(bf16_random, monkeypatch, direct_io, cache):
    _, ts, arrays = bf16_random
    paths = shard_paths(arrays)
    if direct_io == "always" and not o_direct_supported(paths[0]):
        pytest.skip("this filesystem refuses O_DIRECT")
    monkeypatch.setattr(R, "PIECE", 4096)  # several pieces per 12 KiB chunk, each checksummed
    want = truth_rows(arrays, loader(arrays, ts, seed=8).epoch_rows(0))
    if cache != "warm":
        for p in paths:
            evict([p], 0, 0 if cache == "cold" else os.path.getsize(p) // 2)
    with loader(arrays, ts, seed=8, direct_io=direct_io, read_threads=3) as ld:
        assert ld.direct_io == (direct_io == "always")
        got = torch.cat(take(iter(ld), ld.batches_per_epoch))
    assert np.array_equal(bits(got).view(np.uint16), want)
    if cache == "cold":
        # O_DIRECT leaves the page cache alone; buffered reads fill it
        assert all(first_page_cached(p) == (direct_io == "never") for p in paths)


@pytest.mark.parametrize("path", ["cached", "buffered", "direct"])
def test_a_damaged_piece_is_caught_in_the_read_threads(tmp_path, monkeypatch, path):
    _, ts, arrays = build(tmp_path, n_models=2, dtype="bfloat16", d=128, kind="random")
    monkeypatch.setattr(R, "PIECE", 4096)
    reader = R.ShardFileReader(arrays[1], arrays[1].chunk_checksums())
    offset = int(reader.index(1)[1, 0])  # chunk 5 = shard 1, inner chunk 1
    shard = shard_paths(arrays[1:])[1]
    if path == "direct" and not o_direct_supported(shard):
        pytest.skip("this filesystem refuses O_DIRECT")
    with open(shard, "r+b") as f:  # the chunk's last piece: rows 32-47 of 48
        f.seek(offset + 12 * 1024 - 100)
        f.write(b"\x01" * 8)
    if path != "cached":
        evict([shard])
    with loader(arrays, ts, direct_io="always" if path == "direct" else "never") as ld, pytest.raises(
            CorruptChunkError, match=r"model1.*chunk 5 \(rows 240-288\) fails its checksum"):
        take(iter(ld), ld.batches_per_epoch)


def test_checks_can_be_turned_off(tmp_path):
    _, ts, arrays = build(tmp_path, n_models=1, dtype="bfloat16", d=128, kind="random")
    with loader(arrays, ts, verify=False, include_first_position=True, shuffle=False, batch_size=48) as ld:
        assert ld._readers[0].read(0, 0, 48, np.empty((48, 128), np.uint16), ld._scratch) is None
        assert len(take(iter(ld), 5)) == 5


@pytest.mark.parametrize("mode,split_gib,passes,available_gib,direct", [
    ("auto", 2, 1.0, 20, True),     # fits, but read once: nothing for the page cache to pay back
    ("auto", 2, 3.0, 20, False),    # fits and comes back: buffered, later passes from memory
    ("auto", 11, 3.0, 20, True),    # more than half of the memory: would evict itself
    ("auto", 2, 3.0, None, True),   # memory unknown
    ("always", 2, 3.0, 20, True), (True, 2, 3.0, 20, True),
    ("never", 50, 1.0, 20, False), (False, 50, 1.0, 20, False),
])
def test_direct_rule(mode, split_gib, passes, available_gib, direct):
    got, why = R.direct_rule(mode, split_gib * 2**30, passes, None if available_gib is None else available_gib * 2**30)
    assert got is direct and ("O_DIRECT" in why or "direct_io=" in why or not direct)


def test_direct_rule_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="direct_io must be one of"):
        R.direct_rule("sometimes", 1, 1.0, 2**30)


def test_planned_rows_decide_auto(bf16_random):
    _, ts, arrays = bf16_random
    once = loader(arrays, ts)
    many = loader(arrays, ts, planned_rows=5 * once.rows_per_epoch)
    assert once.direct_io and not many.direct_io  # the fixture's few KiB fit in any memory
    assert "page cache" in many.direct_io_reason and "O_DIRECT" in once.direct_io_reason


def test_zero_chunks_and_partial_last_chunk_with_direct_io(tmp_path):
    # d 16 bfloat16: chunks of 128 rows are one 4 KiB block; the last chunk (rows 640-703) is half
    # a block, read with O_DIRECT through the scratch buffer, up to the shard file's index
    _, ts, arrays = build(tmp_path, n_models=2, dtype="bfloat16", d=16, chunk=128, shard=384, kind="random",
                          zero_chunks=(2,))
    paths = shard_paths(arrays)
    if not o_direct_supported(paths[0]):
        pytest.skip("this filesystem refuses O_DIRECT")
    want = truth_rows(arrays, np.arange(N_SEQ * CTX))
    evict(paths)
    with loader(arrays, ts, split="validation", shuffle=False, include_first_position=True, batch_size=50,
                direct_io="always") as ld:
        got = torch.cat(list(ld))
    assert not first_page_cached(paths[0])  # shard 0 untouched by the validation pass: a sanity check
    assert np.array_equal(bits(got).view(np.uint16), want[T:])
    evict(paths)  # first_page_cached's miss started a readahead
    with loader(arrays, ts, shuffle=False, include_first_position=True, batch_size=128, direct_io="always") as ld:
        batches = take(iter(ld), 5)
    assert all(not first_page_cached(p) for p in paths)  # O_DIRECT left the page cache alone
    assert (batches[2] == 0).all() and not (batches[1] == 0).all()
    assert np.array_equal(bits(torch.cat(batches)).view(np.uint16), want[:640])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_travel_in_bfloat16_and_arrive_in_float32(bf16_random):
    _, ts, arrays = bf16_random
    with loader(arrays, ts, device="cuda") as gpu, loader(arrays, ts) as cpu:
        g, c = take(iter(gpu), 20), take(iter(cpu), 20)
    assert all(x.is_cuda and x.dtype == torch.float32 for x in g)
    assert all(torch.equal(bits_of(x.cpu()), bits_of(y.float())) for x, y in zip(g, c))
    assert S.TORCH_DTYPE["bfloat16"] == torch.bfloat16
