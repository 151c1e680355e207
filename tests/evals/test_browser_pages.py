"""The browser's files without a browser: data files are valid JS holding exactly the JSON they
were given (whatever the token strings), the index table's columns from planted statistics, the
decoder statistics in both relative-norm conventions, and latents.html's links to the browser."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from evals import latent_page as P
from evals.browser.exports import _script_json
from evals.browser.modeldiff import diff_stats, read_latent_scaling
from evals.browser.pages import as_script
from evals.browser.records import index_table, rounded

NASTY = ["</script><script>alert(1)</script>", "\u2028line\u2029sep", "quote\"'`${x}", "\\", "\n\t", "\u00e9\u4e2d"]


def test_data_files_hold_exactly_their_json(tmp_path):
    p = tmp_path / "vocab.js"
    p.write_text(as_script("MDIFF_VOCAB", NASTY), encoding="utf-8")
    assert _script_json(p, "window.MDIFF_VOCAB = ") == NASTY
    b = tmp_path / "block.js"
    b.write_text(as_script("mdiffBlock", [3, [{"t": NASTY}]], call=True), encoding="utf-8")
    assert _script_json(b, "mdiffBlock(") == [3, [{"t": NASTY}]]
    node = subprocess.run(["bash", "-c", "command -v node"], capture_output=True, text=True).stdout.strip()
    if node:  # a JS engine reads the same strings back
        script = f"const window = {{}}; {p.read_text()}; process.stdout.write(JSON.stringify(window.MDIFF_VOCAB));"
        out = subprocess.run([node, "-e", script], capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == NASTY
    with pytest.raises(ValueError):
        as_script("X", [float("nan")])  # NaN is not JSON: records write null


def test_decoder_statistics_in_both_conventions():
    W = torch.zeros(4, 2, 3)
    W[0, 0, 0], W[0, 1, 0] = 1.0, 3.0  # r = 3/4, delta = (2/3 + 1)/2
    W[1, 0, 1] = 2.0  # A only: r = 0, delta = 0
    W[2, 0, 2], W[2, 1, 2] = 1.0, 1.0  # r = delta = 1/2
    d = diff_stats(W, ["A", "B"], None, np.array([False, False, False, True]))
    np.testing.assert_allclose(d.r[:3], [0.75, 0.0, 0.5])
    np.testing.assert_allclose(d.delta[:3], [(2 / 3 + 1) / 2, 0.0, 0.5])
    assert d.classes[1] == "A-only" and d.classes[2] == "shared" and d.classes[3] == "dead"
    assert d.dead.tolist() == [False, False, False, True] and d.dead_known
    sae = diff_stats(torch.ones(3, 1, 2), ["A"], None, None)
    assert sae.r is None and list(sae.classes) == ["live"] * 3 and not sae.dead_known


def test_index_table_columns_from_planted_statistics():
    from evals.browser.collect import Collection

    W = torch.zeros(3, 2, 2)
    W[:, 0, 0] = 1.0
    W[:, 1, 1] = torch.tensor([1.0, 0.0, 19.0])
    diff = diff_stats(W, ["A", "B"], None, None)
    coll = Collection(columns=["joint"], n_latents=3, context_length=4, first_row=0, tokens=np.zeros((1, 4)),
                      keys=np.zeros(4), n_rows=200, top_values=np.array([[[2.5], [0.0], [1.0]]]),
                      top_rows=np.zeros((1, 3, 1)), bins=[], firing=[{"fired": np.array([50, 0, 2])}])
    t = index_table(coll, diff)
    cols = {c["key"]: c for c in t["columns"]}
    assert cols["density"]["values"] == [0.25, 0.0, 0.01] and cols["max"]["values"] == [2.5, 0.0, 1.0]
    assert cols["r"]["values"] == [0.5, 0.0, 0.95] and cols["delta"]["values"] == [0.5, 0.0, rounded(0.5 * (18 / 19 + 1))]
    assert [cols["class"]["cats"][v] for v in cols["class"]["values"]] == ["shared", "A-only", "B-only"]
    assert t["default_sort"] == "r" and "dead" not in t["shown"]


def test_latent_scaling_csv_without_pairs(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("latent,nu_epsilon,nu_r,class\n2,0.5,nan,decoupling\n")
    (s,) = read_latent_scaling(p, 3)
    assert s.pair == "" and s.nu_epsilon[2] == 0.5 and np.isnan(s.nu_r[2]) and s.classes[2] == "decoupling"
    assert read_latent_scaling(tmp_path / "absent.csv", 3) == []
    p.write_text("latent,nu_eps\n1,2\n")
    with pytest.raises(ValueError, match="lacks the column"):
        read_latent_scaling(p, 3)


def test_latents_html_links_to_the_browser():
    groups = [P.LatentGroup("g", cards=[P.LatentCard(7, "shared")])]
    with_link = P.render_latent_page("t", [("a", 1)], groups, browser="browser")
    assert 'href="browser/index.html"' in with_link and 'href="browser/latent.html#7"' in with_link
    assert "browser/" not in P.render_latent_page("t", [("a", 1)], groups)


def test_histogram_ticks_are_exact_at_zero():
    svg = P.svg_histogram([1, 2, 3, 4], np.linspace(-1, 0, 5))
    ticks = [t.split(">")[1] for t in svg.split('class="tick"')[1:]]
    assert "0<" in "".join(t + "<" for t in ticks) and not any("e-" in t for t in ticks)
