"""The latent browser built from a real (tiny) store, against brute force: every validation row
encoded at once, densities, maxima, top contexts (identical windows once), per-token activations
of the windows, per-source and per-class frequencies, decoder norms in both conventions, logit
effects through the tiny llama's final norm and unembedding, Latent Scaling's CSV, the dead mask,
the row limit, the Neuronpedia batch files, the JSON export and `mdiff browse`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.bench_browser import chromium, open_page
from evals.browser import BrowserSpec, build_browser, latent_json
from evals.browser.exports import _script_json
from evals.browser.modeldiff import LatentScalingFileError
from evals.config import EvalSpec, TokenClassSpec
from evals.token_classes import token_table
from mdiff.tiny import train_section
from pipeline import store as S
from trainer.dictionaries import load_dictionary

EVAL = EvalSpec(token_classes=[TokenClassSpec("chat", "special")])
SPEC = BrowserSpec(top_k=4, bands=2, per_band=2, context_before=3, context_after=2, logit_tokens=5, block_size=16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cached store of two tiny llamas, a crosscoder on both and an SAE on the first."""
    from mdiff.config import load_config
    from mdiff.tiny import build_fixture, write_config
    from pipeline.cache import run_cache
    from trainer import train as T

    d = tmp_path_factory.mktemp("browser")
    fx = build_fixture(d, archs=("llama",), seeds=(0, 1), n_docs=120, d_model=32, n_layers=2)
    kw = {"n_tokens": 2048, "hooks": ((1, "resid_post"),), "store": str(d / "store")}
    run_cache(load_config(write_config(d / "cache.toml", fx, **kw)), log=lambda *a: None, progress=False)
    out = {}
    for name, models, spec in [
            ("cc", ["llama-s0", "llama-s1"],
             'name = "cc"\narchitecture = "relu"\nn_latents = 40\nl1_coefficient = 0.3'),
            ("sae", ["llama-s0"], 'name = "sae"\narchitecture = "topk"\nn_latents = 24\nk = 4')]:
        section = train_section(models, [spec], steps=20, lr=3e-3, eval_every=20, eval_batches=1,
                                checkpoint_every=1000, read_threads=1)
        path = write_config(d / f"{name}.toml", fx, name=name, train=section, **kw)
        cfg = load_config(path)
        out[name] = (cfg, T.run_train(cfg, log=lambda *a: None, progress=False).out_dir / name, path)
    return d, fx, out


def validation(cfg, dict_dir, array_paths):
    """Brute force: every validation row's codes [N, L] (SAE: per array), tokens, sources, keep mask."""
    meta = json.loads((dict_dir / "config.json").read_text())
    root = S.StoreRoot(cfg.store)
    ts = S.open_token_set(root, meta["tokenset_id"])
    first, ctx = ts.n_train_sequences, ts.context_length
    tokens = np.asarray(ts.tokens[first:]).astype(np.int64)
    xs = [S.read_rows(S.open_activation_array(root, p), first * ctx, ts.n_sequences * ctx).float() for p in array_paths]
    d = load_dictionary(dict_dir).eval()
    with torch.no_grad():
        codes = ([d.encode(torch.stack(xs, 1)).numpy()] if d.n_models > 1
                 else [d.encode(x[:, None]).numpy() for x in xs])
    keep = np.arange(tokens.size) % ctx != 0
    return codes, tokens, np.asarray(ts.source[first:]), keep, first * ctx, ctx, d, meta


def records(browser):
    meta = _script_json(browser / "data" / "meta.js", "window.MDIFF_META = ")
    recs = []
    for f in meta["block_files"]:
        recs += _script_json(browser / "data" / f, "mdiffBlock(")[1]
    return meta, recs


def window(tokens, row, ctx, before=3, after=2):
    seq, pos = divmod(row, ctx)
    return tuple(int(tokens[seq, p]) if 0 <= p < ctx else None for p in range(pos - before, pos + after + 1))


@pytest.fixture(scope="module")
def crosscoder_browser(trained):
    d, fx, runs = trained
    cfg, dict_dir, _ = runs["cc"]
    out = d / "eval-cc"
    res = build_browser(dict_dir, cfg, EVAL, out, spec=BrowserSpec(**{**SPEC.__dict__, "neuronpedia": True}),
                        tokenizer=fx["tokenizer"], progress=False)
    return res, out / "browser", cfg, dict_dir, fx


def test_crosscoder_records_match_brute_force(crosscoder_browser):
    res, browser, cfg, dict_dir, fx = crosscoder_browser
    meta_cfg = json.loads((dict_dir / "config.json").read_text())
    codes, tokens, sources, keep, row0, ctx, d, _ = validation(cfg, dict_dir, meta_cfg["arrays"])
    f = codes[0]
    meta, recs = records(browser)
    assert meta["columns"] == ["joint"] and meta["n_rows"] == keep.sum() == res["rows"]
    assert len(recs) == d.n_latents == 40
    special = np.isin(tokens.reshape(-1), list(token_table(fx["tokenizer"]).special_ids))
    attrs = S.open_token_set(S.StoreRoot(cfg.store), meta_cfg["tokenset_id"]).attrs
    names = [[f[0] for f in src["files"]][0] for src in attrs["sources"]]  # one file per source here
    norms = d.W_dec.detach().norm(dim=-1).numpy()
    for j, rec in enumerate(recs):
        a = f[keep, j]
        assert rec["act"][0]["fired"] == (a > 0).sum()
        assert rec["act"][0]["max"] == pytest.approx(a.max(), rel=1e-3)
        assert sum(rec["act"][0]["hist"]["counts"]) == (a > 0).sum()
        # per source, per token class
        for g, group in enumerate(meta["groups"]):
            if group["kind"] == "source":
                rows = np.repeat(sources, ctx) == names.index(group["name"])
            else:
                rows = special
            assert rec["groups"][g][0] == pytest.approx((f[keep & rows, j] > 0).mean(), abs=1e-3)
        # model diff, both conventions
        na, nb = norms[j]
        assert rec["diff"]["r"] == pytest.approx(nb / (na + nb), rel=1e-3)
        assert rec["diff"]["delta"] == pytest.approx(0.5 * ((nb - na) / max(na, nb) + 1), rel=1e-3)
        # top contexts: the largest activations over distinct windows
        top = rec["examples"][0][0]
        assert top["band"] == -1
        seen, expected = set(), []
        for r in np.argsort(-np.where(keep, f[:, j], -1), kind="stable"):
            if len(expected) == 4 or not keep[r] or f[r, j] <= 0:
                break
            if window(tokens, r, ctx) not in seen:
                seen.add(window(tokens, r, ctx))
                expected.append(int(r))
        # the same values; under ties (a causal model gives equal activations after equal
        # prefixes) any of the tied rows may be shown, each window at most once
        np.testing.assert_allclose([ex["v"] for ex in top["items"]], f[expected, j], rtol=1e-3)  # 4 digits
        assert len({window(tokens, ex["row"] - row0, ctx) for ex in top["items"]}) == len(expected)
        for ex in top["items"]:
            r = ex["row"] - row0
            assert ex["v"] == pytest.approx(f[r, j], rel=1e-3)
            assert [t if t >= 0 else None for t in ex["t"]] == list(window(tokens, r, ctx))
            for k, p in enumerate(range(r - 3, r + 3)):  # per-token activations of the window
                if not 0 <= p - (r - r % ctx) < ctx:
                    assert ex["a"][k] == -1
                elif p % ctx == 0:
                    assert ex["a"][k] == -1  # position 0 is not encoded
                else:
                    assert ex["a"][k] == pytest.approx(f[p, j] / a.max() * 1000, abs=1.01)
        for g in rec["examples"][0][1:]:  # bands: within their edges, no context shown twice
            assert all(g["lo"] - 1e-3 <= ex["v"] <= g["hi"] + 1e-3 for ex in g["items"])
        shown = [window(tokens, ex["row"] - row0, ctx) for g in rec["examples"][0] for ex in g["items"]]
        assert len(shown) == len(set(shown))


def test_logit_effects_read_through_the_final_norm_and_unembedding(crosscoder_browser):
    from transformers import AutoModelForCausalLM

    _, browser, cfg, dict_dir, fx = crosscoder_browser
    _, recs = records(browser)
    meta = json.loads((dict_dir / "config.json").read_text())
    d = load_dictionary(dict_dir)
    for m, name in enumerate(meta["models"]):
        lm = AutoModelForCausalLM.from_pretrained(fx["models"][name]).eval()
        W_U, gamma = lm.lm_head.weight.detach(), lm.model.norm.weight.detach()
        scores = (d.W_dec[:, m].detach() / meta["scales"][m] * gamma) @ W_U.T
        for j in (0, 7, 39):
            assert [t for t, _ in recs[j]["logits"][m]["pos"]] == scores[j].argsort(descending=True)[:5].tolist()
            assert [t for t, _ in recs[j]["logits"][m]["neg"]] == scores[j].argsort()[:5].tolist()
            assert recs[j]["logits"][m]["pos"][0][1] == pytest.approx(scores[j].max().item(), rel=2e-3)


def test_neuronpedia_batches_and_json_export(crosscoder_browser):
    _, browser, cfg, dict_dir, fx = crosscoder_browser
    meta, recs = records(browser)
    batch = json.loads((browser / "neuronpedia" / "llama-s1" / "batch-0.json").read_text())
    assert {"model_id", "layer", "sae_set", "sae_id_suffix", "features"} <= set(batch) and batch["layer"] == 1
    feat = batch["features"][3]
    # every field Neuronpedia's converter reads
    for key in ("feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
                "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1", "neg_str",
                "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
                "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                "decoder_weights_dist", "activations"):
        assert key in feat, key
    assert feat["feature_index"] == 3 and feat["frac_nonzero"] == recs[3]["act"][0]["density"]
    assert sum(feat["logits_hist_data_bar_heights"]) == len(token_table(fx["tokenizer"]).strings)
    first = feat["activations"][0]
    assert first["bin_min"] == -1 and first["bin_contains"] == -1
    assert first["values"][first["qualifying_token_index"]] == pytest.approx(first["bin_max"], rel=2e-3)
    assert len(first["tokens"]) == len(first["values"])
    table = token_table(fx["tokenizer"])
    exported = latent_json(browser, 3)
    ex = exported["record"]["examples"][0][0]["items"][0]
    assert ex["tokens"][meta["center"]] == P_display(table.decode(ex["t"][meta["center"]]))
    assert ex["activations"][meta["center"]] == pytest.approx(ex["v"], rel=2e-3)
    assert [table.decode(ex["t"][k]) for k in range(len(ex["t"])) if ex["t"][k] >= 0] == first["tokens"]
    with pytest.raises(ValueError, match="outside"):
        latent_json(browser, 40)


def P_display(s):
    from evals.latent_page import display_token

    return display_token(s)


def test_sae_has_a_column_per_model_and_the_row_limit_holds(trained, tmp_path):
    d, fx, runs = trained
    cfg, dict_dir, _ = runs["sae"]
    spec = BrowserSpec(**{**SPEC.__dict__, "rows": 100, "logit_effects": False})
    res = build_browser(dict_dir, cfg, EVAL, tmp_path, spec=spec, tokenizer=fx["tokenizer"], progress=False)
    meta, recs = records(tmp_path / "browser")
    assert meta["columns"] == ["llama-s0", "llama-s1"] and res["rows"] == meta["n_rows"] == 100
    from pipeline import experiment as E

    other = E.find_array(S.StoreRoot(cfg.store), meta["tokenset_id"], cfg.model("llama-s1"),
                         E.hook_by_label(cfg, "layer1.resid_post"))
    arrays = json.loads((dict_dir / "config.json").read_text())["arrays"] + [other.path]
    codes, *_, keep, row0, ctx, sae, _ = validation(cfg, dict_dir, arrays)
    scanned = np.flatnonzero(keep)[:100]
    for rec in recs:
        for c in range(2):
            assert rec["act"][c]["fired"] == (codes[c][scanned, rec["id"]] > 0).sum()
        assert rec["class"] in ("live", "dead") and rec["logits"] == [] and "r" not in rec["diff"]
    index = _script_json(tmp_path / "browser" / "data" / "index.js", "window.MDIFF_INDEX = ")
    assert {"density:llama-s0", "density:llama-s1", "max:llama-s1"} <= {c["key"] for c in index["columns"]}


def test_latent_scaling_csv_and_the_dead_mask_are_shown(trained, tmp_path, monkeypatch):
    from trainer.trained import TrainedDictionary

    d, fx, runs = trained
    cfg, dict_dir, _ = runs["cc"]
    dead = torch.zeros(40, dtype=torch.bool)
    dead[[2, 5]] = True
    monkeypatch.setattr(TrainedDictionary, "dead_mask", lambda self: dead, raising=False)
    (tmp_path / "latent_scaling.csv").write_text("latent,base,ft,nu_epsilon,nu_r,class\n"
                                                 "1,llama-s0,llama-s1,0.1,0.3,genuine\n"
                                                 "3,llama-s0,llama-s1,0.5,0.6,other\n"
                                                 "4,llama-s0,llama-s1,0.9,,shrinkage\n")
    spec = BrowserSpec(**{**SPEC.__dict__, "rows": 60, "logit_effects": False})
    build_browser(dict_dir, cfg, EVAL, tmp_path, spec=spec, tokenizer=fx["tokenizer"], progress=False)
    _, recs = records(tmp_path / "browser")
    assert [r["id"] for r in recs if r["dead"]] == [2, 5] and recs[2]["class"] == "dead"
    assert recs[1]["diff"]["nu"] == [{"pair": "llama-s1 vs llama-s0", "eps": 0.1, "r": 0.3, "class": "genuine"}]
    assert recs[4]["diff"]["nu"][0]["r"] is None and recs[0]["diff"]["nu"][0]["eps"] is None
    index = _script_json(tmp_path / "browser" / "data" / "index.js", "window.MDIFF_INDEX = ")
    cols = {c["key"]: c for c in index["columns"]}
    assert cols["nu_eps"]["values"][1] == 0.1 and cols["dead"]["values"][5] == 1
    if chromium():  # the page badges the classes of exclusive latents only, not "other" or "shared"
        for latent, badge in ((1, "\u03bd: genuine"), (4, "\u03bd: shrinkage"), (3, None)):
            dom, console, _ = open_page(f"file://{tmp_path}/browser/latent.html#{latent}")
            assert console == [] and f"<h1>Latent {latent}" in dom
            assert (badge in dom) if badge else 'class="badge nu"' not in dom
    (tmp_path / "latent_scaling.csv").write_text("latent,nu_epsilon,nu_r,class\n99,0.1,0.2,x\n")
    with pytest.raises(LatentScalingFileError, match="latent 99 is outside"):
        build_browser(dict_dir, cfg, EVAL, tmp_path, spec=spec, tokenizer=fx["tokenizer"], progress=False)


def test_mdiff_browse_builds_and_exports(trained, capsys):
    from mdiff.cli import main as cli_main

    d, fx, runs = trained
    cfg, dict_dir, path = runs["cc"]
    assert cli_main(["browse", str(path), "--no-progress", "--rows", "50", "--no-logits"]) == 0
    out = capsys.readouterr().out
    assert "40 latents, 50 tokens scanned" in out
    index = next(p for p in out.split() if p.endswith("index.html"))
    assert "<table" in open(index, encoding="utf-8").read()
    assert cli_main(["browse", str(path), "--export-latent", "7"]) == 0
    exported = capsys.readouterr().out.split()[-1]
    assert json.loads(open(exported, encoding="utf-8").read())["latent"] == 7
    assert cli_main(["browse", str(path), "--export-latent", "400"]) == 2
    assert "outside 0..39" in capsys.readouterr().err
    assert cli_main(["browse", str(path), "--top-k", "0"]) == 2
    assert "browser.top_k" in capsys.readouterr().err
