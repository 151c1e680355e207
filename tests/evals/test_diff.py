"""Stage three model-diff analyses: decoder-norm classes, token classes, activation statistics,
top contexts and the HTML page.

Most tests use constructed decoders and dictionaries with hand-computed answers; the last ones
run the driver on a tiny cached store with a briefly trained crosscoder and SAE, and check the
page against a brute-force recomputation.
"""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from evals import activations as A
from evals import decoder_norms as N
from evals import diff as D
from evals import latent_page as P
from evals import plots as PL
from evals import token_classes as TC
from evals.config import EvalSpec, TokenClassSpec
from mdiff.tiny import train_section as tiny_train_section
from pipeline import store as S
from trainer.config import DictionarySpec
from trainer.dictionaries import build_dictionary, load_dictionary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "source", "wbr"}


class StrictParser(HTMLParser):
    """Fails on mismatched or unclosed tags; collects tags, text, latent cards and snippets."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.tags, self.text = [], [], {}, []
        self.cards: dict[int, list[dict]] = {}  # latent -> snippets in page order
        self.card_order: list[int] = []
        self._latent = None
        self._snippet = None
        self._in_mark = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag not in _VOID:
            self.stack.append(tag)
        if tag == "details" and "data-latent" in a:
            self._latent = int(a["data-latent"])
            self.cards[self._latent] = []
            self.card_order.append(self._latent)
        if tag == "li" and "data-row" in a:
            self._snippet = {"row": int(a["data-row"]), "value": float(a["data-value"]), "mark": ""}
            self.cards[self._latent].append(self._snippet)
        if tag == "mark":
            self._in_mark = True

    def handle_startendtag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'} at {self.getpos()}")
            return
        self.stack.pop()
        if tag == "mark":
            self._in_mark = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_mark:
            self._snippet["mark"] += data


def parse_html(path: Path) -> StrictParser:
    p = StrictParser()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    assert not p.errors, p.errors[:5]
    assert [t for t in p.stack if t not in ("html", "body")] == []
    return p


def decoder(rows: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------------------- decoder norms


def two_model_decoder() -> torch.Tensor:
    e0, e1, z = [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.0, 0, 0, 0]
    return decoder([
        [e0, z],                       # (1, 0)    r = 0     A-only
        [z, e1],                       # (0, 1)    r = 1     B-only
        [e0, e0],                      # (1, 1)    r = 0.5   shared, cos 1
        [e0, [0, 0.5, 0, 0]],          # (1, 0.5)  r = 1/3   shared, cos 0
        [z, z],                        # (0, 0)              dead
        [e0, [-0.25, 0, 0, 0]],        # (1, 0.25) r = 0.2   other, cos -1
        [[0.05, 0, 0, 0], [0, 0.95, 0, 0]],  # r = 0.95       B-only
    ])


def test_two_model_classes_relative_norms_and_cosines():
    a = N.decoder_norm_analysis(two_model_decoder(), ["base", "chat"], EvalSpec())
    r = a.relative
    np.testing.assert_allclose(r[[0, 1, 2, 3, 5, 6]], [0, 1, 0.5, 1 / 3, 0.2, 0.95], atol=1e-7)
    assert math.isnan(r[4])
    assert list(a.classes) == ["base-only", "chat-only", "shared", "shared", "dead", "other", "chat-only"]
    assert a.counts == {"base-only": 1, "chat-only": 2, "shared": 2, "other": 1, "dead": 1}
    np.testing.assert_allclose(a.norms[3], [1, 0.5], atol=1e-7)
    np.testing.assert_allclose(a.cosine[[2, 3, 5]], [1, 0, -1], atol=1e-7)
    assert math.isnan(a.cosine[0]) and math.isnan(a.cosine[4])  # a zero decoder has no direction
    np.testing.assert_allclose(sorted(a.shared_cosine), [0, 1], atol=1e-7)
    np.testing.assert_allclose(a.specificity[[0, 1, 2, 3]], [0.5, 0.5, 0, 0.5 - 1 / 3], atol=1e-7)
    assert list(a.favoured) == [0, 1, 0, 0, -1, 0, 1]
    groups = N.rank_specific(a, top=10)
    assert list(groups[0]) == [0, 5, 3, 2] and list(groups[1]) == [1, 6]  # by |r - 0.5|, dead left out
    # thresholds come from the spec
    tight = N.decoder_norm_analysis(two_model_decoder(), ["base", "chat"],
                                    EvalSpec(specific_below=0.25, specific_above=0.97, shared_band=[0.4, 0.6]))
    assert list(tight.classes) == ["base-only", "chat-only", "shared", "other", "dead", "base-only", "other"]


def test_n_model_shares_sum_to_one_and_classes():
    e0, e1, z = [1.0, 0, 0], [0, 1.0, 0], [0.0, 0, 0]
    a = N.decoder_norm_analysis(decoder([
        [e0, z, z],                        # only model 0
        [e0, e0, e1],                      # balanced: shared; cosines 1, 0, 0 -> mean 1/3
        [e0, e1, z],                       # two of three: other
        [z, z, z],                         # dead
        [[0.3, 0, 0], e0, e0],             # shares .13 .43 .43: model 0 below 2*0.3/3 = 0.2: other
        [[0.8, 0, 0], e0, e0],             # shares .29 .36 .36: shared
        [[0.01, 0, 0], [0.01, 0, 0], e1],  # share .98: only model 2
    ]), ["a", "b", "c"])
    alive = a.classes != N.DEAD
    np.testing.assert_allclose(a.shares[alive].sum(1), 1, atol=1e-12)
    assert a.relative is None
    assert list(a.classes) == ["a-only", "shared", "other", "dead", "other", "shared", "c-only"]
    assert a.counts["shared"] == 2 and a.counts["b-only"] == 0
    np.testing.assert_allclose(a.cosine[1], 1 / 3, atol=1e-7)
    assert a.thresholds["shared_min_share"] == pytest.approx(0.2)
    # with symmetric thresholds the n-model rule is the two-model rule
    w = torch.randn(500, 2, 8) * torch.rand(500, 2, 1) ** 3
    two = N.decoder_norm_analysis(w, ["x", "y"])
    s = two.shares
    again = np.where(s[:, 1] > 0.9, "y-only", np.where(s[:, 0] > 0.9, "x-only",
                     np.where(s.min(1) >= 0.3, "shared", "other")))
    assert (two.classes == again).all()


def test_norm_plots_png_and_html(tmp_path):
    a = N.decoder_norm_analysis(two_model_decoder(), ["base", "chat"])
    paths = PL.write_norm_plots(a, tmp_path / "two", log_y=True)
    assert {p.name for p in paths.values()} == {"relative_norms.png", "shared_cosine.png", "relative_norms.html"}
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    assert paths["relative_norms_png"].read_bytes()[:8] == PNG_MAGIC
    assert paths["shared_cosine_png"].read_bytes()[:8] == PNG_MAGIC
    page = parse_html(paths["relative_norms_html"])
    assert page.tags["svg"] == 3 and "script" not in page.tags  # r (classes), delta, cosines
    text = "".join(page.text)
    for cls in a.counts:  # the class-count table
        assert cls in text
    assert "".join(page.text).count("): 1") >= 4  # bar tooltips: "[lo, hi): count"
    assert "[0.99, 1): 1" in text and "[0.33, 0.34): 1" in text  # r = 1 falls in the last bin
    html = paths["relative_norms_html"].read_text()
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing external

    three = N.decoder_norm_analysis(torch.randn(40, 3, 6), ["a", "b", "c"])
    paths = PL.write_norm_plots(three, tmp_path / "three")
    assert paths["relative_norms_png"].read_bytes()[:8] == PNG_MAGIC
    page = parse_html(paths["relative_norms_html"])
    assert page.tags["svg"] == 4  # one share histogram per model, plus the cosines


def test_svg_histogram_counts_and_marks():
    svg = P.svg_histogram([0, 3, 1000], [0.0, 0.5, 1.0, 1.5], title="t <x>", xlabel="value",
                          log_y=True, marks=[(0.75, "cut")])
    p = StrictParser()
    p.feed(svg)
    assert not p.errors and p.tags["svg"] == 1
    text = "".join(p.text)
    assert "[0.5, 1): 3" in text and "[1, 1.5): 1000" in text and "[0, 0.5)" not in text
    assert "t <x>" in text and "cut" in text and "(log scale)" in text
    with pytest.raises(ValueError):
        P.svg_histogram([1, 2], [0.0, 1.0])


# ------------------------------------------------------------------------------- token classes


@pytest.fixture(scope="module")
def tiny_tokenizer():
    import tempfile

    from mdiff.tiny import make_corpus, make_tokenizer

    with tempfile.TemporaryDirectory() as d:
        files = make_corpus(d, n_docs=60)
        texts = files["text"].read_text().split("\n\n")
    return make_tokenizer(texts)


def test_token_classes_special_regex_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "The king said."},
                                    {"role": "assistant", "content": "Light!"}], tokenize=False)
    ids = np.asarray(tok(chat + "<|eos|>", add_special_tokens=False)["input_ids"])
    strings = [tok.decode([int(i)]) for i in ids]
    markers = {"<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"}
    assert {"<|bos|>", "<|user|>", "<|assistant|>", "<|end|>", "<|eos|>"} <= set(strings)

    special = TC.select_token_class(TokenClassSpec("chat", "special"), ids, tok)
    assert [s for s, m in zip(strings, special) if m] == [s for s in strings if s in markers]
    only_end = TC.select_token_class(TokenClassSpec("end", "special", ["<|end|>"]), ids, tok)
    assert [s for s, m in zip(strings, only_end) if m] == ["<|end|>", "<|end|>"]

    punct = TC.select_token_class(TokenClassSpec("punct", "regex", [r"^[.!?]$"]), ids, tok)
    assert [s for s, m in zip(strings, punct) if m] == [s for s in strings if s in (".", "!", "?")]
    assert punct.sum() == 2
    listed = TC.select_token_class(TokenClassSpec("listed", "tokens", ["ing", "\n"]), ids, tok)
    assert listed.tolist() == [s in ("ing", "\n") for s in strings] and listed.sum() >= 2
    # shape is kept, out-of-vocabulary ids select nothing
    grid = TC.select_token_class(TokenClassSpec("chat", "special"), np.array([[0, 5], [10**6, 7]]), tok)
    assert grid.tolist() == [[True, True], [False, False]]
    table = TC.token_table(tok)
    assert TC.token_table(tok) is table and table.decode(3) == "<|user|>"


# ------------------------------------------------------------------------------- activation statistics


def constructed_sae():
    """ReLU SAE, d = 2, three latents: f0 = relu(x0), f1 = relu(x1), f2 = relu(x0 - x1)."""
    sae = build_dictionary(DictionarySpec(name="t", architecture="relu", n_latents=3), 1, 2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_activation_stats_hand_computed():
    sae = constructed_sae()
    base = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
    chat = torch.tensor([[2.0, 2.0], [0.0, 0.0], [-1.0, 0.0], [4.0, 0.0]])
    # f on base: f0 = [1, 0, 0, 3]   f1 = [0, 2, 0, 1]   f2 = [1, 0, 0, 2]
    # f on chat: f0 = [2, 0, 0, 4]   f1 = [2, 0, 0, 0]   f2 = [0, 0, 0, 4]
    table = TC.TokenTable(["<s>", "a", "b", "."], frozenset({0}))
    ids = torch.tensor([0, 1, 3, 3])
    stats = A.activation_stats(sae, {"base": base, "chat": chat}, token_ids=ids, tokenizer=table,
                               token_classes=[TokenClassSpec("special", "special"),
                                              TokenClassSpec("dot", "tokens", ["."])], batch_rows=3)
    assert stats.columns == ["base", "chat"] and stats.n_tokens == 4
    np.testing.assert_allclose(stats.freq, [[0.5, 0.5, 0.5], [0.5, 0.25, 0.25]])
    np.testing.assert_allclose(stats.mean, [[1.0, 0.75, 0.75], [1.5, 0.5, 1.0]])
    np.testing.assert_allclose(stats.mean_active, [[2.0, 1.5, 1.5], [3.0, 2.0, 4.0]])
    sp, dot = stats.by_class["special"], stats.by_class["dot"]  # rows {0} and {2, 3}
    assert sp.n_tokens == 1 and dot.n_tokens == 2
    np.testing.assert_allclose(sp.freq, [[1, 0, 1], [1, 1, 0]])
    np.testing.assert_allclose(sp.mean, [[1, 0, 1], [2, 2, 0]])
    np.testing.assert_allclose(dot.freq, [[0.5, 0.5, 0.5], [0.5, 0, 0.5]])
    np.testing.assert_allclose(dot.mean_active, [[3, 1, 2], [4, 0, 4]])
    # rankings: f1 fires less on chat, f0 gains the most mean activation
    assert list(A.rank_increase(stats, "base", "chat", metric="mean", top=2)) == [0, 2]
    assert list(A.rank_increase(stats, "base", "chat", metric="freq", top=3, decrease=True))[:2] == [1, 2]

    # the running top-k: the two largest activations of every latent on chat, with their rows
    scan = A.scan_activations(sae, A.tensor_batches([base, chat], batch_rows=3), columns=["base", "chat"],
                              top_k=2, track={"chat": None, "base": [2]})
    assert scan.top["chat"].of(0) == [(4.0, 3), (2.0, 0)]
    assert scan.top["chat"].of(1) == [(2.0, 0)]  # only one positive activation
    assert scan.top["base"].of(2) == [(2.0, 3), (1.0, 0)]
    with pytest.raises(KeyError):
        scan.top["base"].of(0)


def test_crosscoder_stats_are_joint():
    cc = build_dictionary(DictionarySpec(name="c", architecture="relu", n_latents=2), 2, 1)
    with torch.no_grad():
        cc.W_enc.copy_(torch.tensor([[[1.0, 0.0]], [[1.0, -1.0]]]))  # f0 = relu(a + b), f1 = relu(-b)
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    a = torch.tensor([[1.0], [-3.0], [0.5]])
    b = torch.tensor([[1.0], [1.0], [-1.0]])
    stats = A.activation_stats(cc, {"A": a, "B": b})
    assert stats.columns == [A.JOINT]
    np.testing.assert_allclose(stats.freq, [[1 / 3, 1 / 3]])
    np.testing.assert_allclose(stats.mean, [[2 / 3, 1 / 3]])


def test_context_snippets_and_page(tmp_path):
    tokens = np.array([[0, 1, 2, 3, 1], [0, 3, 3, 2, 1]])
    table = TC.TokenTable(["<s>", "a", " b\n", "<&>"], frozenset({0}))
    top = A.TopActivations(np.array([7]), np.array([[5.0, 2.0, 0.0]]), np.array([[8, 2, -1]]))
    snips = A.context_snippets(top, [7], tokens, table, context_tokens=1, seq_offset=10, row_offset=50)
    s0, s1 = snips[7]
    assert (s0.token, s0.left, s0.right, s0.seq, s0.pos, s0.row) == (" b\n", ["<&>"], ["a"], 11, 3, 58)
    assert (s1.token, s1.left, s1.right, s1.value) == (" b\n", ["a"], ["<&>"], 2.0)
    card = P.LatentCard(7, "chat-only", "r = 0.99", [("relative norm r", 0.99)], snips[7])
    path = P.write_latent_page(tmp_path / "p.html", "page <1>", [("dictionary", "x")],
                               [P.LatentGroup("Most specific to chat", "", [card]), P.LatentGroup("empty")],
                               counts={"chat-only": 1})
    page = parse_html(path)
    assert page.card_order == [7]
    assert [s["mark"] for s in page.cards[7]] == [P.display_token(" b\n")] * 2
    assert [s["row"] for s in page.cards[7]] == [58, 52]
    assert "&lt;&amp;&gt;" in path.read_text()  # escaped context


# ------------------------------------------------------------------------------- the driver, end to end


def _train_section(models, dictionary):
    return tiny_train_section(models, [dictionary], steps=40, lr=3e-3, eval_every=40,
                              eval_batches=1, checkpoint_every=1000, read_threads=1)

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cached store of two tiny models, a crosscoder on both and an SAE on the first."""
    from mdiff.config import load_config
    from mdiff.tiny import build_fixture, write_config
    from pipeline.cache import run_cache
    from trainer import train as T

    d = tmp_path_factory.mktemp("diff")
    fx = build_fixture(d, archs=("llama",), seeds=(0, 1), n_docs=120, d_model=32, n_layers=2)
    kw = {"n_tokens": 2048, "hooks": ((1, "resid_post"),), "store": str(d / "store")}
    run_cache(load_config(write_config(d / "cache.toml", fx, **kw)), log=lambda *a: None, progress=False)
    out = {}
    for name, models, spec in [
            ("cc", ["llama-s0", "llama-s1"], 'name = "cc"\narchitecture = "relu"\nn_latents = 48\nl1_coefficient = 0.3'),
            ("sae", ["llama-s0"], 'name = "sae"\narchitecture = "topk"\nn_latents = 48\nk = 4')]:
        cfg = load_config(write_config(d / f"{name}.toml", fx, name=name, train=_train_section(models, spec), **kw))
        report = T.run_train(cfg, log=lambda *a: None, progress=False)
        out[name] = (cfg, report.out_dir / name)
    return d, fx["tokenizer"], out


SPEC = EvalSpec(n_sequences=12, scan_rows=400, top_latents=6, contexts_per_latent=3, context_tokens=3,
                token_classes=[TokenClassSpec("chat", "special"), TokenClassSpec("punct", "regex", [r"[.!?]"])])


def _validation_codes(cfg, dict_dir, models):
    """Brute force: every scanned row's codes per column, its token ids, and the row offset. An SAE
    sees every other model in its own model's units: stored rows x s_A / s_B."""
    meta = json.loads((dict_dir / "config.json").read_text())
    d = load_dictionary(dict_dir).eval()
    root = S.StoreRoot(cfg.store)
    ts = S.open_token_set(root, meta["tokenset_id"])
    first, ctx = ts.n_train_sequences, ts.context_length
    n = min(-(-SPEC.scan_rows // ctx), ts.n_sequences - first)  # whole sequences holding scan_rows
    tokens = np.asarray(ts.tokens[first:first + n]).reshape(-1)
    arrays = [S.open_activation_array(root, p) for p in models]
    xs = [S.read_rows(a, first * ctx, (first + n) * ctx).float() for a in arrays]
    if d.n_models == 1:
        xs = [x * (meta["scales"][0] / a.scale) for x, a in zip(xs, arrays)]
    keep = np.arange(n * ctx) % ctx != 0
    with torch.no_grad():
        codes = [f.numpy() for f in A.encode_columns(d, xs)]
    return codes, tokens, keep, first * ctx, d, meta


def test_crosscoder_page_lists_the_most_specific_latents_with_their_top_contexts(trained, tmp_path):
    _, tok, runs = trained
    cfg, dict_dir = runs["cc"]
    summary = D.analyse_dictionary(dict_dir, cfg, SPEC, tmp_path, tok, progress=False)
    for f in ("relative_norms.png", "relative_norms.html", "shared_cosine.png", "latents.html", "diff.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert not (tmp_path / "activation_stats.csv").exists()
    assert json.loads((tmp_path / "diff.json").read_text())["counts"] == summary["counts"]
    assert sum(summary["counts"].values()) == 48

    codes, tokens, keep, row0, d, _ = _validation_codes(cfg, dict_dir, meta_arrays(dict_dir))
    f = codes[0]
    # the expected latents, computed independently: |r - 0.5| descending, split by side
    norms = d.W_dec.detach().norm(dim=-1).numpy()
    r = norms[:, 1] / norms.sum(1)
    expected = {}
    for side, ids in (("llama-s0", np.flatnonzero(r <= 0.5)), ("llama-s1", np.flatnonzero(r > 0.5))):
        expected[f"Most specific to {side}"] = [int(j) for j in ids[np.argsort(-np.abs(r[ids] - 0.5))][:6]]
    assert summary["groups"] == expected

    page = parse_html(tmp_path / "latents.html")
    assert page.card_order == [j for ids in expected.values() for j in ids]
    assert page.tags["svg"] >= 1 and "script" not in page.tags
    table = TC.token_table(tok)
    for latent, snippets in page.cards.items():
        acts = np.where(keep, f[:, latent], -np.inf)
        n_pos = int((acts > 0).sum())
        assert len(snippets) == min(3, n_pos)
        if not snippets:
            continue
        best = np.sort(acts)[::-1][:len(snippets)]
        np.testing.assert_allclose([s["value"] for s in snippets], best, rtol=1e-5)
        assert snippets[0]["value"] == pytest.approx(acts.max(), rel=1e-5)  # the first is the argmax
        for s in snippets:
            local = s["row"] - row0
            assert keep[local]
            assert f[local, latent] == pytest.approx(s["value"], rel=1e-5)
            assert s["mark"] == P.display_token(table.decode(int(tokens[local])))


def meta_arrays(dict_dir):
    return json.loads((dict_dir / "config.json").read_text())["arrays"]


def test_sae_on_both_models_writes_stats_csv_scatter_and_page(trained, tmp_path):
    _, tok, runs = trained
    cfg, dict_dir = runs["sae"]
    summary = D.analyse_dictionary(dict_dir, cfg, SPEC, tmp_path, tok, progress=False)
    assert summary["kind"] == "SAE"
    assert set(summary["files"]) == {"activation_stats_csv", "activation_scatter_png", "latents_html", "diff_json"}
    assert (tmp_path / "activation_scatter.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "relative_norms.png").exists()

    # brute force: the SAE applied to each model's activations at the same rows
    from pipeline import experiment as E
    hook = E.hook_by_label(cfg, "layer1.resid_post")
    other = E.find_array(S.StoreRoot(cfg.store), json.loads((dict_dir / "config.json").read_text())["tokenset_id"],
                         cfg.model("llama-s1"), hook)
    codes, tokens, keep, _, _, _ = _validation_codes(cfg, dict_dir, meta_arrays(dict_dir) + [other.path])
    freq = [(c[keep] > 0).mean(0) for c in codes]
    mean = [c[keep].mean(0) for c in codes]
    chat_rows = np.isin(tokens[keep], list(TC.token_table(tok).special_ids))

    with (tmp_path / "activation_stats.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {"chat/freq_A", "punct/mean_active_B"} <= set(rows[0])
    by_freq = [r for r in rows if r["ranking"] == "freq"]
    by_mean = [r for r in rows if r["ranking"] == "mean"]
    assert len(by_freq) == len(by_mean) == 6
    assert {r["model_A"] for r in rows} == {"llama-s0"} and {r["model_B"] for r in rows} == {"llama-s1"}
    delta = np.sort(freq[1] - freq[0])[::-1][:6]
    np.testing.assert_allclose([float(r["delta"]) for r in by_freq], delta, rtol=1e-4, atol=1e-6)
    for r in by_freq + by_mean:
        j = int(r["latent"])
        assert float(r["freq_A"]) == pytest.approx(freq[0][j], abs=1e-5)
        assert float(r["freq_B"]) == pytest.approx(freq[1][j], abs=1e-5)
        assert float(r["mean_B"]) == pytest.approx(mean[1][j], rel=1e-4, abs=1e-6)
        assert float(r["chat/freq_B"]) == pytest.approx((codes[1][keep][chat_rows, j] > 0).mean(), abs=1e-5)

    page = parse_html(tmp_path / "latents.html")
    ups = [int(r["latent"]) for r in by_freq]
    assert page.card_order[:6] == ups == summary["groups"]["Fires more on llama-s1 than on llama-s0"]
    for latent in ups:  # contexts of the "more on B" group are B's top activations
        acts = np.where(keep, codes[1][:, latent], -np.inf)
        snippets = page.cards[latent]
        assert snippets and snippets[0]["value"] == pytest.approx(acts.max(), rel=1e-5)
