"""Sequence order in a token set: shuffled within each source too, so the validation split (the last
sequences) is a random sample of every source, not the tail of its stream; seeded, and the same on
every rebuild; token sets packed by the older rule are refused with the way to rebuild them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from mdiff.tiny import make_tokenizer
from pipeline import store as S
from pipeline.config import SourceSpec, TokenSpec
from pipeline.tokens import TOKEN_SET_FORMAT, build_token_set, iter_token_set, plan_token_set

L = 8  # BOS + 7 stream tokens: one planted document (6 ids + EOS) fills one sequence exactly
FIRST_ID = 3  # ids 0-2 are BOS, EOS, PAD


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(["the river ran past the old stone house"] * 4)


def planted(path, n_docs: int, first_id: int = FIRST_ID):
    """Document i is the id (first_id + i) six times: the stream's sequence i carries it."""
    with path.open("w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"input_ids": [first_id + i] * (L - 2)}) + "\n")
    return SourceSpec(kind="tokenized", paths=[str(path)])


def stream_index(tokens: np.ndarray, first_id: int = FIRST_ID) -> np.ndarray:
    """Which sequence of its source's stream each row is, read off the planted ids."""
    assert (tokens[:, 1:-1] == tokens[:, 1:2]).all(), "every row is one planted document"
    return tokens[:, 1].astype(np.int64) - first_id


def spec_of(*sources, n_sequences: int, validation_fraction: float = 0.2, seed: int = 0) -> TokenSpec:
    return TokenSpec(sources=list(sources), context_length=L, n_tokens=n_sequences * L,
                     validation_fraction=validation_fraction, seed=seed)


def test_validation_rows_are_a_random_sample_of_a_single_source(tok, tmp_path):
    spec = spec_of(planted(tmp_path / "a.jsonl", 150), n_sequences=100)
    plan = plan_token_set(spec)
    tokens, source = build_token_set(spec, tok)
    assert (tokens[:, 0] == tok.bos_token_id).all() and (tokens[:, -1] == tok.eos_token_id).all()
    idx = stream_index(tokens)
    # exactly the stream's first 100 sequences, each once, but not in stream order
    assert sorted(idx.tolist()) == list(range(100))
    assert not (np.diff(idx) > 0).all()
    val = idx[-plan.n_validation:]
    assert len(val) == 20
    assert set(val.tolist()) != set(range(80, 100)), "the validation split is the stream's tail"
    # a random sample reaches into the whole stream: some of it from the first half
    assert (val < 50).sum() >= 3 and (val >= 50).sum() >= 3


def test_every_source_is_shuffled_and_its_validation_rows_are_sampled(tok, tmp_path):
    a = planted(tmp_path / "a.jsonl", 80)
    b = planted(tmp_path / "b.jsonl", 80, first_id=FIRST_ID + 100)
    spec = spec_of(a, b, n_sequences=120, validation_fraction=0.25, seed=3)
    plan = plan_token_set(spec)
    tokens, source = build_token_set(spec, tok)
    for s, first in ((0, FIRST_ID), (1, FIRST_ID + 100)):
        idx = stream_index(tokens[source == s], first)
        assert sorted(idx.tolist()) == list(range(plan.counts[s]))
        assert not (np.diff(idx) > 0).all()
        val = stream_index(tokens[-plan.n_validation:][source[-plan.n_validation:] == s], first)
        tail = set(range(plan.counts[s] - len(val), plan.counts[s]))
        assert len(val) >= 5 and set(val.tolist()) != tail


def test_order_follows_the_documented_rule(tok, tmp_path):
    """storage_layout.md: position i (label s, its r-th label s) holds sequence perm_s[r] of source
    s's stream, perm_s = default_rng([seed, 1, s]).permutation(counts[s]); labels as before."""
    a = planted(tmp_path / "a.jsonl", 60)
    b = planted(tmp_path / "b.jsonl", 60, first_id=FIRST_ID + 100)
    spec = spec_of(a, b, n_sequences=70, seed=11)
    tokens, source = build_token_set(spec, tok)
    counts = plan_token_set(spec).counts
    labels = np.repeat(np.arange(2), counts)
    np.random.default_rng(11).shuffle(labels)
    np.testing.assert_array_equal(source, labels)
    perms = [np.random.default_rng([11, 1, s]).permutation(c) for s, c in enumerate(counts)]
    seen = [0, 0]
    for i, s in enumerate(source.tolist()):
        first = FIRST_ID + 100 * s
        assert stream_index(tokens[i:i + 1], first)[0] == perms[s][seen[s]], f"row {i}"
        seen[s] += 1


def test_same_seed_same_order_other_seed_other_order(tok, tmp_path):
    src = planted(tmp_path / "a.jsonl", 120)
    a = build_token_set(spec_of(src, n_sequences=100, seed=1), tok)[0]
    b = build_token_set(spec_of(src, n_sequences=100, seed=1), tok)[0]
    c = build_token_set(spec_of(src, n_sequences=100, seed=2), tok)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # one source: only the within-source shuffle can differ
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, c.tolist()))


def test_blocks_do_not_depend_on_block_size(tok, tmp_path):
    spec = spec_of(planted(tmp_path / "a.jsonl", 60), planted(tmp_path / "b.jsonl", 60, FIRST_ID + 100),
                   n_sequences=50)
    whole = build_token_set(spec, tok)
    blocks = list(iter_token_set(spec, tok, block_sequences=7))
    assert [len(t) for t, _ in blocks] == [7] * 7 + [1]
    np.testing.assert_array_equal(np.concatenate([t for t, _ in blocks]), whole[0])
    np.testing.assert_array_equal(np.concatenate([s for _, s in blocks]), whole[1])


def test_scratch_file_is_removed(tok, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spec = spec_of(planted(tmp_path / "a.jsonl", 60), n_sequences=50)
    blocks = list(iter_token_set(spec, tok, block_sequences=16, scratch_dir=str(scratch)))
    assert len(blocks) == 4 and list(scratch.iterdir()) == []
    gen = iter_token_set(spec, tok, block_sequences=16, scratch_dir=str(scratch))
    next(gen)
    assert len(list(scratch.iterdir())) == 1  # in use while the writer reads
    gen.close()  # an abandoned build (a killed writer's generator) leaves nothing behind
    assert list(scratch.iterdir()) == []


# ------------------------------------------------------------------------------------ in the store


def _store(tmp_path, name="store") -> S.StoreRoot:
    root = S.StoreRoot(str(tmp_path / name))
    root.ensure_format(create=True)
    return root


def test_a_resumed_write_is_the_same_token_set(tok, tmp_path):
    spec = spec_of(planted(tmp_path / "a.jsonl", 90), planted(tmp_path / "b.jsonl", 90, FIRST_ID + 100),
                   n_sequences=80, seed=4)

    def killed_after(n_blocks):
        for i, block in enumerate(iter_token_set(spec, tok, block_sequences=16)):
            if i == n_blocks:
                raise KeyboardInterrupt
            yield block

    root = _store(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        S.write_token_set(root, "ts-0000000000000001", 80, L, killed_after(2), {"n_train_sequences": 64})
    assert not S.token_set_complete(root, "ts-0000000000000001")
    resumed = S.write_token_set(root, "ts-0000000000000001", 80, L, iter_token_set(spec, tok),
                                {"n_train_sequences": 64})
    fresh = S.write_token_set(_store(tmp_path, "other"), "ts-0000000000000001", 80, L,
                              iter_token_set(spec, tok, block_sequences=5), {"n_train_sequences": 64})
    np.testing.assert_array_equal(resumed.tokens[:], fresh.tokens[:])
    np.testing.assert_array_equal(resumed.source[:], fresh.source[:])
    assert resumed.attrs["tokenset_format"] == TOKEN_SET_FORMAT


def _rewrite_attrs(root: S.StoreRoot, ts_id: str, edit) -> None:
    group = zarr.open_group(store=root.zarr_store(), path=S.tokenset_path(ts_id), mode="r+")
    attrs = group.attrs.asdict()
    edit(attrs)
    group.attrs.clear()
    group.attrs.update(attrs)


def _written(root: S.StoreRoot, ts_id: str, attrs: dict | None = None) -> None:
    toks = np.zeros((4, L), np.int32)
    S.write_token_set(root, ts_id, 4, L, [(toks, np.zeros(4, np.uint8))], {"n_train_sequences": 3, **(attrs or {})})


@pytest.mark.parametrize("old", [None, 1])
def test_a_token_set_of_the_older_order_is_refused_with_how_to_rebuild(tmp_path, old):
    root = _store(tmp_path)
    ts_id = "ts-00000000000000aa"
    _written(root, ts_id)

    def make_old(attrs):
        if old is None:
            attrs.pop("tokenset_format")  # what the older writer left: no such attribute
        else:
            attrs["tokenset_format"] = old

    _rewrite_attrs(root, ts_id, make_old)
    with pytest.raises(S.StoreFormatError) as e:
        S.open_token_set(root, ts_id)
    msg = str(e.value)
    assert ts_id in msg and f"token-set format {old or 1}" in msg and f"format {TOKEN_SET_FORMAT}" in msg
    assert "stream order" in msg and "mdiff cache" in msg
    assert f"{root.url}/tokensets/{ts_id}" in msg and f"{root.url}/activations/{ts_id}" in msg


def test_a_newer_token_set_format_is_refused_with_upgrade(tmp_path):
    root = _store(tmp_path)
    _written(root, "ts-00000000000000bb")
    _rewrite_attrs(root, "ts-00000000000000bb", lambda a: a.update(tokenset_format=TOKEN_SET_FORMAT + 1))
    with pytest.raises(S.StoreFormatError, match="upgrade mdiff"):
        S.open_token_set(root, "ts-00000000000000bb")


def test_an_imported_token_set_keeps_its_foreign_order(tmp_path):
    """Imported rows are in the foreign cache's order, which no packing rule changed: an import
    written before the format existed still opens."""
    root = _store(tmp_path)
    _written(root, "ts-00000000000000cc", {"imported_from": {"format": "saelens"}})
    _rewrite_attrs(root, "ts-00000000000000cc", lambda a: a.pop("tokenset_format"))
    assert S.open_token_set(root, "ts-00000000000000cc").n_sequences == 4
