"""Writing the browser: two HTML pages, their script and style, and the data files they load.

    browser/
      index.html            every latent in a sortable, filterable table (index.html#latent-123)
      latent.html           one latent at a time: latent.html#123
      assets/               browser.css, format.js (numbers), index.js, latent.js
      data/meta.js          the run: dictionary, models, columns, groups, block layout
      data/index.js         the index table, columnar
      data/vocab.js         every token id as shown (line breaks and tabs made visible)
      data/block-00000.js   the records of latents 0..block_size-1 (evals/browser/records.py), ...

Data files are scripts that hand their JSON to the page (window.MDIFF_META = {...},
mdiffBlock(b, [...])): Chromium refuses fetch() of file:// URLs but runs script tags, so the
browser opens from disk, offline, with no server. Nothing is rendered until it is viewed (the
index draws only the rows in view; the latent page loads one block file).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from evals.latent_page import esc
from pipeline.records import atomic_write_text

from .static_format import FORMAT_JS
from .static_index import INDEX_JS
from .static_latent import LATENT_JS
from .static_style import CSS


def as_script(name: str, value, call: bool = False) -> str:
    """`window.NAME = <json>;` (or `NAME(<args>);`), valid JS for any JSON (U+2028/9 escaped)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f"{name}({text[1:-1]});\n" if call else f"window.{name} = {text};\n"


def block_file(b: int) -> str:
    return f"block-{b:05d}.js"


def _page(title: str, header: str, body: str, scripts: Sequence[str]) -> str:
    tags = "".join(f'<script src="{esc(s)}"></script>' for s in scripts)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<link rel=\"stylesheet\" href=\"assets/browser.css\">\n</head>\n<body>\n"
            f"<header class=\"top\"><div class=\"bar\"><span class=\"brand\">mdiff<small>latent browser</small></span>"
            f"{header}</div></header>\n{body}\n"
            "<noscript><p class=\"error\">This page needs JavaScript (it runs from disk; nothing is "
            "fetched from the network).</p></noscript>\n"
            f"{tags}\n</body>\n</html>\n")


def index_html(title: str, subtitle: str, summary: Sequence[tuple[str, str]], figures: Sequence[str]) -> str:
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in summary)
    figs = "".join(f"<figure>{f}</figure>" for f in figures)
    body = (f"<main>\n<h1>{esc(title)}</h1>\n<p class=\"sub\">{esc(subtitle)}</p>\n"
            f"<table class=\"summary\">{rows}</table>\n"
            f"<section class=\"figs\" aria-label=\"histograms\">{figs}</section>\n"
            "<div class=\"controls\"><label>Class <select id=\"cls\"><option value=\"\">all</option></select>"
            "</label><label><input type=\"checkbox\" id=\"live\"> live only</label>"
            "<span class=\"spacer-flex\"></span><span id=\"count\" class=\"note\"></span></div>\n"
            "<div class=\"table\" role=\"table\"><div class=\"thead\" id=\"thead\" role=\"row\"></div>"
            "<div class=\"viewport\" id=\"viewport\"><div class=\"vspace\" id=\"vspace\">"
            "<div class=\"rows\" id=\"rows\"></div></div></div></div>\n"
            "<p class=\"note\">Click a column to sort (again to reverse); the view is in the address, so it "
            "can be linked. Each latent's page is latent.html#&lt;id&gt;.</p>\n</main>")
    header = ("<span class=\"spacer-flex\"></span><input type=\"search\" id=\"q\" inputmode=\"numeric\" "
              "placeholder=\"Latent id, Enter to open\" aria-label=\"latent id\">")
    return _page(title, header, body, ["data/meta.js", "data/index.js", "assets/format.js", "assets/index.js"])


def latent_html(title: str) -> str:
    header = ("<a id=\"back\" href=\"index.html\">\u2190 All latents</a><a id=\"prev\" href=\"#0\">\u2039 prev</a>"
              "<a id=\"next\" href=\"#1\">next \u203a</a><span class=\"spacer-flex\"></span>"
              "<input type=\"search\" id=\"q\" inputmode=\"numeric\" placeholder=\"Go to latent\" "
              "aria-label=\"latent id\"><button id=\"json\" type=\"button\">Download JSON</button>")
    body = "<main id=\"latent\"><p class=\"note\">Loading\u2026</p></main>"
    return _page(title, header, body, ["data/meta.js", "data/vocab.js", "assets/format.js", "assets/latent.js"])


def write_browser(out: str | Path, *, meta: dict, index: dict, vocab: Sequence[str], blocks,
                  title: str, subtitle: str, summary: Sequence[tuple[str, str]], figures: Sequence[str] = (),
                  progress: bool = False) -> dict:
    """Write every file of the browser under `out`; `blocks` yields (block index, records).

    Returns {"index_html", "latent_html", "files", "bytes", "block_bytes_max"}.
    """
    out = Path(out)
    (out / "assets").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    n_blocks = -(-meta["n_latents"] // meta["block_size"])
    meta = {**meta, "block_files": [block_file(b) for b in range(n_blocks)]}
    files = {"assets/browser.css": CSS, "assets/format.js": FORMAT_JS, "assets/index.js": INDEX_JS,
             "assets/latent.js": LATENT_JS,
             "data/meta.js": as_script("MDIFF_META", meta), "data/index.js": as_script("MDIFF_INDEX", index),
             "data/vocab.js": as_script("MDIFF_VOCAB", list(vocab)),
             "index.html": index_html(title, subtitle, summary, figures), "latent.html": latent_html(title)}
    sizes = {}
    for rel, text in files.items():
        atomic_write_text(out / rel, text)
        sizes[rel] = (out / rel).stat().st_size
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_blocks, unit="block", desc="browser pages", dynamic_ncols=True)
    for b, records in blocks:
        rel = f"data/{block_file(b)}"
        atomic_write_text(out / rel, as_script("mdiffBlock", [b, records], call=True))
        sizes[rel] = (out / rel).stat().st_size
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    block_sizes = [v for k, v in sizes.items() if k.startswith("data/block-")]
    return {"index_html": out / "index.html", "latent_html": out / "latent.html", "files": len(sizes),
            "bytes": sum(sizes.values()), "block_bytes_max": max(block_sizes, default=0)}
