"""The token set: documents from every source kind, packing, mixing, order, validation split, id."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from mdiff.tiny import make_corpus, make_tokenizer
from pipeline.config import SourceSpec, TokenSpec
from pipeline.tokens import (
    TokenSourceError,
    build_token_set,
    describe_sources,
    iter_documents,
    iter_token_set,
    plan_token_set,
    token_set_id,
)
from pipeline.tokens.plan import _allocate

L = 32


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    # the libraries read these at import time: patch the live values too, whatever imported them first
    try:
        import datasets.config as dc

        monkeypatch.setattr(dc, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(dc, "HF_DATASETS_OFFLINE", True, raising=False)
        monkeypatch.setattr(dc, "HF_DATASETS_CACHE", tmp_path / "hf_cache", raising=False)
    except ImportError:  # pragma: no cover
        pass
    try:
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    files = make_corpus(d, n_docs=200, seed=0)
    paragraphs = [p.strip() for p in files["text"].read_text().split("\n\n") if p.strip()]
    chats = [json.loads(line)["messages"] for line in files["chat"].read_text().splitlines()]
    # a second, disjoint-content source: other pseudo-prose
    other = make_corpus(d / "other", n_docs=200, seed=1)
    other_pars = [p.strip() for p in other["text"].read_text().split("\n\n") if p.strip()]
    return {"dir": d, **files, "paragraphs": paragraphs, "chats": chats,
            "other": other["jsonl"], "other_paragraphs": other_pars}


@pytest.fixture(scope="module")
def tok(corpus):
    return make_tokenizer(corpus["paragraphs"])


@pytest.fixture(scope="module")
def tok_no_template(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def reference(docs, tok, context_length=L, bos=True, sep="eos"):
    """Direct computation of one source's packed sequences (sep: a token id, "eos" or None)."""
    after = [] if sep is None else [tok.eos_token_id if sep == "eos" else sep]
    stream = []
    for d in docs:
        ids = d if isinstance(d, list) else tok(d, add_special_tokens=False)["input_ids"]
        if bos and ids and ids[0] == tok.bos_token_id:  # each sequence has one BOS, documents none
            ids = ids[1:]
        stream += list(ids) + after
    body = context_length - 1 if bos else context_length
    n = len(stream) // body
    head = [tok.bos_token_id] if bos else []
    return np.array([head + stream[k * body:(k + 1) * body] for k in range(n)], dtype=np.int32).reshape(
        n, context_length
    )


def packed(spec, tok):
    """build_token_set with every source's rows put back in its stream's order, by the rule
    storage_layout.md gives: the r-th position of source s holds sequence perm_s[r] of its stream."""
    tokens, source = build_token_set(spec, tok)
    out = tokens.copy()
    for s, count in enumerate(plan_token_set(spec).counts):
        where = np.flatnonzero(source == s)
        out[where[np.random.default_rng([spec.seed, 1, s]).permutation(count)]] = tokens[where]
    return out, source


def spec_of(*sources, n_tokens=None, context_length=L, validation_fraction=0.0, seed=0):
    return TokenSpec(sources=list(sources), context_length=context_length,
                     n_tokens=n_tokens if n_tokens is not None else 40 * context_length,
                     validation_fraction=validation_fraction, seed=seed)


def jsonl_src(path, **kw):
    return SourceSpec(kind="jsonl", paths=[str(path)], **kw)


# ------------------------------------------------------------------------------------------- packing


def test_packing_single_source_matches_direct_computation(corpus, tok):
    spec = spec_of(jsonl_src(corpus["jsonl"]), n_tokens=100 * L)
    tokens, source = packed(spec, tok)
    assert tokens.dtype == np.int32 and source.dtype == np.uint8
    assert tokens.shape == (100, L) and (source == 0).all()
    assert (tokens[:, 0] == tok.bos_token_id).all()
    ref = reference(corpus["paragraphs"], tok)
    np.testing.assert_array_equal(tokens, ref[:100])
    # the concatenation minus BOS is the prefix of the document stream, EOS between documents
    stream = []
    for p in corpus["paragraphs"]:
        stream += tok(p, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat = tokens[:, 1:].reshape(-1).tolist()
    assert flat == stream[: len(flat)]
    first_doc = tok(corpus["paragraphs"][0], add_special_tokens=False)["input_ids"]
    assert flat[len(first_doc)] == tok.eos_token_id
    assert (tokens[:, 1:] == tok.bos_token_id).sum() == 0  # BOS only at the start


def test_packing_without_bos_uses_full_context(corpus, tok):
    t = copy.deepcopy(tok)
    t.bos_token = None
    assert t.bos_token_id is None
    tokens, _ = packed(spec_of(jsonl_src(corpus["jsonl"])), t)
    np.testing.assert_array_equal(tokens, reference(corpus["paragraphs"], tok, bos=False)[: len(tokens)])


def test_blocks_are_independent_of_block_size(corpus, tok):
    spec = spec_of(jsonl_src(corpus["jsonl"]), jsonl_src(corpus["other"], weight=2), n_tokens=50 * L)
    blocks = list(iter_token_set(spec, tok, block_sequences=7))
    assert [len(b[0]) for b in blocks] == [7] * 7 + [1]
    tokens, source = build_token_set(spec, tok)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), tokens)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), source)


def test_a_source_names_its_own_separator(corpus, tok):
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end not in (tok.eos_token_id, tok.unk_token_id, None)
    tokens, _ = packed(spec_of(jsonl_src(corpus["jsonl"], separator="<|end|>")), tok)
    np.testing.assert_array_equal(tokens, reference(corpus["paragraphs"], tok, sep=end)[:40])
    assert (tokens == tok.eos_token_id).sum() == 0 and (tokens == end).sum() > 0
    tokens, _ = packed(spec_of(jsonl_src(corpus["jsonl"], separator="none")), tok)
    np.testing.assert_array_equal(tokens, reference(corpus["paragraphs"], tok, sep=None)[:40])
    default = packed(spec_of(jsonl_src(corpus["jsonl"])), tok)[0]
    np.testing.assert_array_equal(packed(spec_of(jsonl_src(corpus["jsonl"], separator="eos")), tok)[0], default)
    with pytest.raises(TokenSourceError, match=r"tokens\.sources\[0\].*separator = '<\|nope\|>' is not one token"):
        build_token_set(spec_of(jsonl_src(corpus["jsonl"], separator="<|nope|>")), tok)


def test_the_separator_is_part_of_the_id_only_when_set(corpus):
    src = jsonl_src(corpus["jsonl"])
    plain = describe_sources(spec_of(src))[0]
    assert "separator" not in plain  # every source without one keeps its description
    assert describe_sources(spec_of(jsonl_src(corpus["jsonl"], separator="<|end|>")))[0]["separator"] == "<|end|>"
    base = token_set_id(spec_of(src), "tok")
    assert token_set_id(spec_of(jsonl_src(corpus["jsonl"], separator="none")), "tok") != base
    assert token_set_id(spec_of(jsonl_src(corpus["jsonl"], separator="<|end|>")), "tok") != base


# ----------------------------------------------------------------------------------------- mixing


def test_allocate_largest_remainder():
    assert _allocate(40, [1, 3]) == [10, 30]
    assert _allocate(10, [1, 1, 1]) == [4, 3, 3]
    assert _allocate(7, [1, 3]) == [2, 5]  # 1.75, 5.25 -> remainders .75 vs .25
    assert _allocate(5, [1, 1000]) == [1, 4]  # every positive weight gets one
    assert _allocate(5, [0, 1]) == [0, 5]
    assert _allocate(1, [1, 1]) == [1, 0]  # not enough for both: plain largest remainder
    assert sum(_allocate(97, [0.1, 0.2, 0.3, 0.4])) == 97


def test_proportions_interleave_and_source_labels(corpus, tok):
    spec = spec_of(jsonl_src(corpus["jsonl"], weight=1), jsonl_src(corpus["other"], weight=3), n_tokens=40 * L)
    plan = plan_token_set(spec)
    assert plan.counts == [10, 30]
    tokens, source = packed(spec, tok)
    assert np.bincount(source, minlength=2).tolist() == [10, 30]
    assert not (np.diff(source.astype(int)) >= 0).all()  # interleaved, not all of source 0 first
    # each source's rows, in order, are exactly that source's own packed sequences
    np.testing.assert_array_equal(tokens[source == 0], reference(corpus["paragraphs"], tok)[:10])
    np.testing.assert_array_equal(tokens[source == 1], reference(corpus["other_paragraphs"], tok)[:30])


def test_order_is_the_seeded_shuffle_of_labels(corpus, tok):
    spec = spec_of(jsonl_src(corpus["jsonl"], weight=1), jsonl_src(corpus["other"], weight=3),
                   n_tokens=40 * L, seed=5)
    _, source = build_token_set(spec, tok)
    labels = np.repeat(np.arange(2), [10, 30])
    np.random.default_rng(5).shuffle(labels)
    np.testing.assert_array_equal(source, labels)


def test_determinism_and_seed(corpus, tok):
    srcs = (jsonl_src(corpus["jsonl"]), jsonl_src(corpus["other"], weight=2))
    a = build_token_set(spec_of(*srcs, n_tokens=60 * L, seed=1), tok)
    b = build_token_set(spec_of(*srcs, n_tokens=60 * L, seed=1), tok)
    c = build_token_set(spec_of(*srcs, n_tokens=60 * L, seed=2), tok)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[0], c[0])

    def rows(t):
        return sorted(map(tuple, t.tolist()))

    assert rows(a[0]) == rows(c[0])  # same multiset of sequences


# ----------------------------------------------------------------------------------- validation


def test_plan_and_validation_split(corpus, tok):
    src = jsonl_src(corpus["jsonl"])
    plan = plan_token_set(spec_of(src, n_tokens=31 * L + 5, validation_fraction=0.1))
    assert (plan.n_sequences, plan.n_tokens, plan.context_length) == (31, 31 * L, L)
    assert plan.n_validation == 3 and plan.n_train_sequences == 28
    assert sum(plan.counts) == plan.n_sequences
    assert plan.source_descriptions[0]["kind"] == "jsonl"
    assert plan_token_set(spec_of(src, n_tokens=31 * L, validation_fraction=0.001)).n_validation == 1
    assert plan_token_set(spec_of(src, n_tokens=31 * L, validation_fraction=0.0)).n_validation == 0

    spec = spec_of(src, jsonl_src(corpus["other"]), n_tokens=40 * L, validation_fraction=0.25)
    plan = plan_token_set(spec)
    tokens, source = build_token_set(spec, tok)
    assert len(tokens) == plan.n_train_sequences + plan.n_validation == 40
    val = source[-plan.n_validation:]
    assert len(val) == 10 and set(val.tolist()) == {0, 1}  # the tail is already a random mix


def test_invalid_specs_name_the_key(corpus):
    src = jsonl_src(corpus["jsonl"])
    with pytest.raises(ValueError, match="context_length"):
        plan_token_set(spec_of(src, context_length=1, n_tokens=10))
    with pytest.raises(ValueError, match="n_tokens"):
        plan_token_set(spec_of(src, n_tokens=L - 1))
    with pytest.raises(ValueError, match="validation_fraction"):
        plan_token_set(spec_of(src, validation_fraction=1.0))
    with pytest.raises(ValueError, match="leaves no training"):
        plan_token_set(spec_of(src, n_tokens=L, validation_fraction=0.5))
    with pytest.raises(ValueError, match="weight"):
        plan_token_set(spec_of(jsonl_src(corpus["jsonl"], weight=-1)))
    with pytest.raises(ValueError, match="needs `paths`"):
        plan_token_set(spec_of(SourceSpec(kind="text")))
    with pytest.raises(TokenSourceError, match="does not exist"):
        plan_token_set(spec_of(jsonl_src(corpus["dir"] / "missing.jsonl")))
    with pytest.raises(TokenSourceError, match="matches no file"):
        plan_token_set(spec_of(jsonl_src(corpus["dir"] / "*.nothing")))


# ------------------------------------------------------------------------------------------ the id


def test_token_set_id(corpus, tmp_path):
    d1 = tmp_path / "a"
    d1.mkdir()
    shutil.copy(corpus["jsonl"], d1 / "prose.jsonl")
    shutil.copy(corpus["other"], d1 / "other.jsonl")

    def spec(d, **kw):
        w = kw.pop("weights", (1, 1))
        return spec_of(jsonl_src(d / "prose.jsonl", weight=w[0]), jsonl_src(d / "other.jsonl", weight=w[1]), **kw)

    base = token_set_id(spec(d1), "tokA")
    assert base.startswith("ts-") and len(base) == 19
    assert token_set_id(spec(d1), "tokA") == base
    assert token_set_id(spec(d1), "tokA", plan_token_set(spec(d1)).source_descriptions) == base

    d2 = tmp_path / "elsewhere" / "b"
    shutil.copytree(d1, d2)
    assert token_set_id(spec(d2), "tokA") == base  # moving the data keeps the id
    assert "elsewhere" not in json.dumps(describe_sources(spec(d2)))

    assert token_set_id(spec(d1, seed=1), "tokA") != base
    assert token_set_id(spec(d1, n_tokens=41 * L), "tokA") != base
    assert token_set_id(spec(d1, context_length=64), "tokA") != base
    assert token_set_id(spec(d1, validation_fraction=0.1), "tokA") != base
    assert token_set_id(spec(d1), "tokB") != base
    assert token_set_id(spec(d1, weights=(1, 3)), "tokA") != base
    with (d2 / "prose.jsonl").open("a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert token_set_id(spec(d2), "tokA") != base


def test_id_of_saved_dataset_directory_survives_a_copy(corpus, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": corpus["paragraphs"][:20]}).save_to_disk(str(tmp_path / "ds"))
    shutil.copytree(tmp_path / "ds", tmp_path / "moved" / "ds2")
    a = token_set_id(spec_of(SourceSpec(kind="hf", name=str(tmp_path / "ds"))), "t")
    b = token_set_id(spec_of(SourceSpec(kind="hf", name=str(tmp_path / "moved" / "ds2"))), "t")
    assert a == b
    desc = describe_sources(spec_of(SourceSpec(kind="hf", name=str(tmp_path / "ds"))))[0]
    assert desc["name"] is None and any(f[0].endswith(".arrow") for f in desc["files"])


# ------------------------------------------------------------------------------------------- chat


def test_chat_rendering(corpus, tok):
    rendered = [tok.apply_chat_template(m, tokenize=False) for m in corpus["chats"]]
    spec = spec_of(jsonl_src(corpus["chat"]), n_tokens=20 * L)  # chat=auto, column -> "messages"
    tokens, _ = packed(spec, tok)
    np.testing.assert_array_equal(tokens, reference(rendered, tok)[:20])
    assert "<|user|>" in tok.decode(tokens[0].tolist(), skip_special_tokens=False)
    yes = packed(spec_of(jsonl_src(corpus["chat"], chat="yes", column="messages"), n_tokens=20 * L), tok)
    np.testing.assert_array_equal(yes[0], tokens)


def test_chat_errors(corpus, tok, tok_no_template):
    with pytest.raises(TokenSourceError, match=r"tokens\.sources\[0\].*chats\.jsonl.*no chat template"):
        build_token_set(spec_of(jsonl_src(corpus["chat"], chat="yes")), tok_no_template)
    with pytest.raises(TokenSourceError, match="no chat template"):  # auto-detected conversations too
        build_token_set(spec_of(jsonl_src(corpus["chat"])), tok_no_template)
    with pytest.raises(TokenSourceError, match="chat = 'no'"):
        build_token_set(spec_of(jsonl_src(corpus["chat"], chat="no", column="messages")), tok)
    with pytest.raises(TokenSourceError, match="holds a string"):
        build_token_set(spec_of(jsonl_src(corpus["jsonl"], chat="yes")), tok)


# --------------------------------------------------------------------------------------- each kind


def test_text_units(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text("alpha one\nalpha two\n\n\n  beta  \n\ngamma\n")
    g = tmp_path / "u.txt"
    g.write_text("delta\n")

    def docs(unit, paths=(str(f),)):
        return list(iter_documents(SourceSpec(kind="text", paths=list(paths), text_unit=unit), tok))

    assert docs("line") == ["alpha one", "alpha two", "  beta  ", "gamma"]
    assert docs("paragraph") == ["alpha one\nalpha two", "beta", "gamma"]
    assert docs("file") == [f.read_text()]
    assert docs("line", [str(tmp_path / "*.txt")]) == ["alpha one", "alpha two", "  beta  ", "gamma", "delta"]


def test_text_kind_end_to_end(corpus, tok):
    for unit in ("paragraph", "line"):  # prose.txt: one paragraph per line, blank lines between
        spec = spec_of(SourceSpec(kind="text", paths=[str(corpus["text"])], text_unit=unit))
        tokens, _ = packed(spec, tok)
        np.testing.assert_array_equal(tokens, reference(corpus["paragraphs"], tok)[:40])
    spec = spec_of(SourceSpec(kind="text", paths=[str(corpus["text"])], text_unit="file"))
    tokens, _ = packed(spec, tok)
    np.testing.assert_array_equal(tokens, reference([corpus["text"].read_text()], tok)[:40])


def test_parquet(corpus, tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(corpus["paragraphs"]))), "text": corpus["paragraphs"]}),
                   tmp_path / "p.parquet", row_group_size=50)
    tokens, _ = packed(spec_of(SourceSpec(kind="parquet", paths=[str(tmp_path / "p.parquet")])), tok)
    np.testing.assert_array_equal(tokens, reference(corpus["paragraphs"], tok)[:40])
    # conversations stored as list<struct<role, content>> are detected and rendered
    pq.write_table(pa.table({"messages": corpus["chats"]}), tmp_path / "c.parquet")
    tokens, _ = packed(spec_of(SourceSpec(kind="parquet", paths=[str(tmp_path / "c.parquet")]),
                                        n_tokens=10 * L), tok)
    rendered = [tok.apply_chat_template(m, tokenize=False) for m in corpus["chats"]]
    np.testing.assert_array_equal(tokens, reference(rendered, tok)[:10])
    with pytest.raises(TokenSourceError, match="column 'body' not found"):
        build_token_set(spec_of(SourceSpec(kind="parquet", paths=[str(tmp_path / "p.parquet")], column="body")), tok)


def test_hf_saved_dataset(corpus, tok, tmp_path):
    import datasets

    pars = corpus["paragraphs"]
    datasets.Dataset.from_dict({"text": pars}).save_to_disk(str(tmp_path / "ds"))
    tokens, _ = packed(spec_of(SourceSpec(kind="hf", name=str(tmp_path / "ds"))), tok)
    np.testing.assert_array_equal(tokens, reference(pars, tok)[:40])

    other = corpus["other_paragraphs"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": pars}),
                          "validation": datasets.Dataset.from_dict({"text": other})}).save_to_disk(
        str(tmp_path / "dd"))
    tokens, _ = packed(spec_of(SourceSpec(kind="hf", name=str(tmp_path / "dd"), split="validation")), tok)
    np.testing.assert_array_equal(tokens, reference(other, tok)[:40])
    with pytest.raises(TokenSourceError, match="split 'test' not in"):
        build_token_set(spec_of(SourceSpec(kind="hf", name=str(tmp_path / "dd"), split="test")), tok)


def test_hf_directory_of_data_files(corpus, tok, tmp_path):
    d = tmp_path / "jdir"
    d.mkdir()
    shutil.copy(corpus["jsonl"], d / "part0.jsonl")
    tokens, _ = packed(spec_of(SourceSpec(kind="hf", name=str(d))), tok)
    np.testing.assert_array_equal(tokens, reference(corpus["paragraphs"], tok)[:40])
    c = tmp_path / "cdir"
    c.mkdir()
    shutil.copy(corpus["chat"], c / "chats.jsonl")
    tokens, _ = packed(spec_of(SourceSpec(kind="hf", name=str(c)), n_tokens=10 * L), tok)
    assert "<|user|>" in tok.decode(tokens[0].tolist(), skip_special_tokens=False)


def test_tokenized(corpus, tok, tmp_path):
    import datasets

    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in corpus["paragraphs"]]
    with (tmp_path / "ids.jsonl").open("w") as f:
        for row in ids:
            f.write(json.dumps({"input_ids": row}) + "\n")
    expected = reference(corpus["paragraphs"], tok)[:40]
    tokens, _ = packed(spec_of(SourceSpec(kind="tokenized", paths=[str(tmp_path / "ids.jsonl")])), tok)
    np.testing.assert_array_equal(tokens, expected)

    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(tmp_path / "ids_ds"))
    tokens, _ = packed(spec_of(SourceSpec(kind="tokenized", name=str(tmp_path / "ids_ds"))), tok)
    np.testing.assert_array_equal(tokens, expected)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"toks": ids}), tmp_path / "ids.parquet")
    tokens, _ = packed(
        spec_of(SourceSpec(kind="tokenized", paths=[str(tmp_path / "ids.parquet")], column="toks")), tok)
    np.testing.assert_array_equal(tokens, expected)

    with (tmp_path / "bad.jsonl").open("w") as f:
        f.write(json.dumps({"input_ids": [3, 4, len(tok) + 7]}) + "\n")
    with pytest.raises(TokenSourceError, match=rf"token id {len(tok) + 7}.*size {len(tok)}"):
        build_token_set(spec_of(SourceSpec(kind="tokenized", paths=[str(tmp_path / "bad.jsonl")])), tok)


# ---------------------------------------------------------------------------------- running out


def test_source_that_runs_out(corpus, tok, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": p}) + "\n" for p in corpus["paragraphs"][:10]))
    n_avail = len(reference(corpus["paragraphs"][:10], tok))
    spec = spec_of(jsonl_src(corpus["jsonl"]), jsonl_src(small), n_tokens=4 * n_avail * L)
    needed = plan_token_set(spec).counts[1]
    assert needed > n_avail
    with pytest.raises(TokenSourceError) as e:
        build_token_set(spec, tok)
    msg = str(e.value)
    assert "tokens.sources[1]" in msg and "jsonl" in msg and "small.jsonl" in msg
    assert f"gave {n_avail} sequences" in msg and f"needs {needed} sequences" in msg
    assert "lower tokens.n_tokens" in msg and "weight" in msg
