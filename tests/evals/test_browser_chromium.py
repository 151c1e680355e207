"""The latent browser in a real browser: headless Chromium opens the pages from file://, runs
their scripts (no console messages at all: no errors, no failed loads), sorts and filters the
index through its address, opens latent pages (their data file loaded on demand), and takes
screenshots (to pytest's tmp dir; also to $MDIFF_BROWSER_SCREENSHOTS when set).

Skipped only when Chromium is absent and $CI is unset; `make test` installs it, and in CI a
missing Chromium fails here."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

from benchmarks.bench_browser import chromium, open_page, ready_ms, synthetic_browser
from evals.browser.exports import _script_json
from evals.browser.spec import BrowserSpec

pytestmark = pytest.mark.skipif(chromium() is None and not os.environ.get("CI"),
                                reason="chromium is not installed (make test installs it: apt-get install -y chromium)")

N_LATENTS = 1500


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    d = tmp_path_factory.mktemp("chromium")
    spec = BrowserSpec(logit_effects=False, block_size=256, top_k=6, bands=3, per_band=2)
    synthetic_browser(d / "browser", n_latents=N_LATENTS, d=16, rows=8192, spec=spec, work=d / "store")
    index = _script_json(d / "browser" / "data" / "index.js", "window.MDIFF_INDEX = ")
    return d / "browser", {c["key"]: c for c in index["columns"]}


def rows_in(dom: str) -> list[int]:
    return [int(m) for m in re.findall(r'<a class="row[^"]*" href="latent\.html#\d+" data-latent="(\d+)"', dom)]


def shot(path, name):
    target = os.environ.get("MDIFF_BROWSER_SCREENSHOTS")
    if target:
        os.makedirs(target, exist_ok=True)
        shutil.copy(path, os.path.join(target, name))


def values(col, ids):
    return np.array([np.nan if col["values"][i] is None else col["values"][i] for i in ids], dtype=float)


def test_index_opens_sorted_by_any_column_without_console_messages(browser, tmp_path):
    path, cols = browser
    dom, console, _ = open_page(f"file://{path}/index.html")
    assert console == [] and ready_ms(dom) is not None
    shown = rows_in(dom)
    r = values(cols["r"], range(N_LATENTS))
    assert 20 <= len(shown) < 200  # only the rows in view exist
    np.testing.assert_array_equal(values(cols["r"], shown), np.sort(r[np.isfinite(r)])[::-1][:len(shown)])
    for sort, key, desc in (("-density", "density", True), ("cos", "cos", False), ("-max", "max", True)):
        dom, console, _ = open_page(f"file://{path}/index.html#sort={sort}")
        assert console == []
        shown = rows_in(dom)
        v = values(cols[key], range(N_LATENTS))
        expected = np.sort(v[np.isfinite(v)])
        expected = expected[::-1] if desc else expected
        np.testing.assert_array_equal(values(cols[key], shown), expected[:len(shown)])
        assert re.search(rf'data-key="{key}"[^>]*aria-sort="{"descending" if desc else "ascending"}"', dom)
    shot_path = tmp_path / "index.png"
    open_page(f"file://{path}/index.html#sort=-density", screenshot=shot_path, size="1280,1000")
    assert shot_path.stat().st_size > 10_000
    shot(shot_path, "index.png")


def test_index_filters_by_class_and_jumps_to_a_latent(browser):
    path, cols = browser
    cats = cols["class"]["cats"]
    cls = max(set(cols["class"]["values"]), key=cols["class"]["values"].count)
    dom, console, _ = open_page(f"file://{path}/index.html#sort=-r&class={cats[cls]}")
    assert console == []
    assert all(cols["class"]["values"][i] == cls for i in rows_in(dom))
    count = cols["class"]["values"].count(cls)
    assert re.search(rf'id="count"[^>]*>{count:,} of {N_LATENTS:,} latents<', dom)
    dom, console, _ = open_page(f"file://{path}/index.html#latent-1234")
    assert console == [] and 'class="row focus" href="latent.html#1234"' in dom


@pytest.mark.parametrize("latent", [0, 1234, N_LATENTS - 1])
def test_latent_pages_load_their_block_on_demand(browser, tmp_path, latent):
    path, cols = browser
    dom, console, _ = open_page(f"file://{path}/latent.html#{latent}")
    assert console == [], console
    assert f'data-latent="{latent}"' in dom and f"<h1>Latent {latent}" in dom
    block = f"data/block-{latent // 256:05d}.js"
    assert f'src="{block}"' in dom and dom.count('src="data/block-') == 1  # only its own block
    _, recs = _script_json(path / block, "mdiffBlock(")
    rec = recs[latent % 256]
    n_examples = sum(len(g["items"]) for g in rec["examples"][0])
    assert dom.count('class="tok hit"') == n_examples  # each example marks its activating token
    if latent == 1234:
        shot_path = tmp_path / "latent.png"
        open_page(f"file://{path}/latent.html#{latent}", screenshot=shot_path, size="1280,1600")
        assert shot_path.stat().st_size > 10_000
        shot(shot_path, "latent.png")


def test_a_bad_latent_id_explains_itself(browser):
    path, _ = browser
    dom, console, _ = open_page(f"file://{path}/latent.html#{N_LATENTS + 5}")
    assert console == [] and 'class="error"' in dom and f"from 0 to {N_LATENTS - 1}" in dom


def test_numbers_keep_their_integer_zeros(tmp_path):
    """The pages' one number formatter, run in Chromium: trailing zeros go only after a decimal point
    (10.4 to 2 digits once read "1", and a maximum activation of 1230 read "123")."""
    from evals.browser.static_format import FORMAT_JS

    cases = [("num(10.4, 2)", "10"), ("num(1230)", "1230"), ("num(150, 3)", "150"), ("num(0.5)", "0.5"),
             ("num(20)", "20"), ("num(722.7)", "722.7"), ("num(-10.4, 2)", "-10"), ("num(0)", "0"),
             ("num(1e-4)", "1.00e-4"), ("num(123456)", "1.23e+5"), ("pct(0)", "0%"), ("pct(0.0152)", "1.52%"),
             ("pct(5e-5)", "5.0e-3%")]
    (tmp_path / "format.js").write_text(FORMAT_JS)
    calls = ", ".join(expr for expr, _ in cases)
    (tmp_path / "page.html").write_text(
        '<!doctype html><html><body><pre id="out"></pre><script src="format.js"></script><script>'
        f"const {{num, pct}} = window.MDIFF_FORMAT; document.getElementById('out').textContent = "
        f"[{calls}].join('|');</script></body></html>")
    dom, console, _ = open_page(f"file://{tmp_path}/page.html")
    assert console == []
    shown = re.search(r'<pre id="out">(.*?)</pre>', dom).group(1).split("|")
    assert shown == [want for _, want in cases]
