"""Self-contained HTML for the model-diff analyses: SVG histograms and the latent browser page.

Everything here is plain HTML + CSS with hand-written SVG: no JavaScript, no external files, so a
page opens from disk in any browser and can be mailed or archived as one file. Hover tooltips are
SVG <title> elements (the browser shows them natively); collapsing uses <details>.

The analyses (evals/diff.py, evals/plots.py) compute the numbers and call:

    svg_histogram(counts, edges, ...)      one histogram as an inline <svg> string
    html_document(title, body)             a complete page around any body
    write_latent_page(path, ...)           the latent page: summary, figures, groups of latent cards
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.records import atomic_write_text

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
     max-width:1100px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0}td,th{padding:2px 10px 2px 0;text-align:left;
      vertical-align:top}th{font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
nav a{margin-right:14px}.note{color:#555}
details.latent{border:1px solid #ddd;border-radius:6px;margin:10px 0;padding:6px 10px}
details.latent>summary{cursor:pointer;font-weight:600}
.cls{font-weight:400;color:#555;margin-left:8px}a.browse{font-weight:400;margin-left:10px;font-size:13px}
ol.snippets{margin:6px 0;padding-left:28px}
li.snippet{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;
           white-space:pre-wrap;word-break:break-all;margin:2px 0}
li.snippet .act{display:inline-block;min-width:64px;color:#0b5394}
li.snippet .ctx{color:#444}
mark{background:#ffd54f;padding:0 1px;border-radius:2px}
.empty{color:#999;font-style:italic}
figure{margin:12px 0}
"""

# Styles carried by each SVG so it also works when pasted on its own.
_SVG_CSS = (".bar{fill:#4c78a8}.bin:hover .bar{fill:#f58518}.hit{fill:transparent}"
            ".axis{stroke:#333;stroke-width:1}.tick{font:11px sans-serif;fill:#333}"
            ".lbl{font:12px sans-serif;fill:#222}.ttl{font:bold 13px sans-serif;fill:#222}"
            ".mark{stroke:#d62728;stroke-width:1;stroke-dasharray:4 3}"
            ".mtext{font:10px sans-serif;fill:#d62728}")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def display_token(s: str) -> str:
    """A token as shown in a snippet: line breaks and tabs made visible, empty tokens marked."""
    if s == "":
        return "\u2205"
    return s.replace("\r\n", "\u23ce").replace("\n", "\u23ce").replace("\r", "\u23ce").replace("\t", "\u21e5")


def fmt(x: float | None, digits: int = 3) -> str:
    """Compact numbers for tables and tooltips (NaN / None shown as an en dash)."""
    if x is None:
        return "\u2013"
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return "\u2013"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}".rstrip("0").rstrip(".") if abs(x) < 1 else f"{x:.{digits}g}"


# ------------------------------------------------------------------------------------------------
# SVG histogram
# ------------------------------------------------------------------------------------------------


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def svg_histogram(counts: Sequence[int], edges: Sequence[float], *, title: str = "",
                  xlabel: str = "", ylabel: str = "latents", log_y: bool = False,
                  marks: Iterable[tuple[float, str]] = (), width: int = 680, height: int = 300) -> str:
    """One histogram as an inline <svg>: bars with hover tooltips ("[lo, hi): n"), axes, and
    dashed vertical lines at `marks` (x, label), e.g. class thresholds. `log_y` plots bar
    heights on log10(1 + count), so single latents next to big clusters stay visible."""
    counts = [int(c) for c in counts]
    edges = [float(e) for e in edges]
    if len(edges) != len(counts) + 1:
        raise ValueError(f"{len(counts)} counts need {len(counts) + 1} edges, got {len(edges)}")
    left, right, top, bottom = 56, 14, 26 if title else 12, 42
    pw, ph = width - left - right, height - top - bottom
    x0, x1 = edges[0], edges[-1]
    cmax = max(counts, default=0)

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1.0) * pw

    def hy(c: float) -> float:  # bar height in pixels
        if cmax <= 0 or c <= 0:
            return 0.0
        if log_y:
            return ph * math.log10(1 + c) / math.log10(1 + cmax)
        return ph * c / cmax

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title or xlabel)}">'),
           f"<style>{_SVG_CSS}</style>"]
    if title:
        out.append(f'<text class="ttl" x="{left}" y="16">{esc(title)}</text>')
    base = top + ph
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        if c <= 0:
            continue
        xa, xb = sx(lo), sx(hi)
        h = max(hy(c), 1.0)
        out.append(f'<g class="bin"><title>[{fmt(lo, 4)}, {fmt(hi, 4)}): {c}</title>'
                   f'<rect class="hit" x="{xa:.2f}" y="{top}" width="{xb - xa:.2f}" height="{ph}"/>'
                   f'<rect class="bar" x="{xa:.2f}" y="{base - h:.2f}" width="{max(xb - xa - 0.3, 0.5):.2f}" '
                   f'height="{h:.2f}"/></g>')
    # axes and ticks
    out.append(f'<line class="axis" x1="{left}" y1="{base}" x2="{left + pw}" y2="{base}"/>')
    out.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{base}"/>')
    step = _nice_step(x1 - x0, 5)
    k0 = math.ceil(x0 / step - 1e-9)
    for k in range(k0, k0 + 1000):
        t = k * step  # from the tick's index, not summed steps: no -5.55e-17 for 0
        if t > x1 + 1e-9 * max(1.0, abs(x1)):
            break
        t = 0.0 if abs(t) < 1e-9 * step else t
        x = sx(t)
        out.append(f'<line class="axis" x1="{x:.2f}" y1="{base}" x2="{x:.2f}" y2="{base + 4}"/>'
                   f'<text class="tick" x="{x:.2f}" y="{base + 16}" text-anchor="middle">{fmt(t, 3)}</text>')
    if log_y:  # 0 at the axis, then 1-2-5 steps (1, 10, 100... once they would crowd)
        steps = (1, 2, 5) if cmax < 1000 else (1,)
        yticks = [0] + [m * 10 ** e for e in range(int(math.log10(max(cmax, 1))) + 1)
                        for m in steps if m * 10 ** e <= cmax]
    else:
        ys = _nice_step(cmax, 4) if cmax > 0 else 1
        yticks = [ys * i for i in range(int(cmax // ys) + 1)] if cmax > 0 else [0]
    for c in yticks:
        y = base - hy(c) if c > 0 else base
        label = f"{int(c)}" if float(c).is_integer() else fmt(c)
        out.append(f'<line class="axis" x1="{left - 4}" y1="{y:.2f}" x2="{left}" y2="{y:.2f}"/>'
                   f'<text class="tick" x="{left - 7}" y="{y + 4:.2f}" text-anchor="end">{label}</text>')
    for i, (x, label) in enumerate(marks):
        if x0 <= x <= x1:
            xs = sx(x)
            # labels right of the line, left of it in the right half; alternate rows to avoid overlap
            tx, anchor = (xs + 3, "start") if xs < left + 0.6 * pw else (xs - 3, "end")
            out.append(f'<g><title>{esc(label)}: {fmt(x, 4)}</title><line class="mark" x1="{xs:.2f}" '
                       f'y1="{top}" x2="{xs:.2f}" y2="{base}"/><text class="mtext" x="{tx:.2f}" '
                       f'y="{top + 10 + 12 * (i % 2)}" text-anchor="{anchor}">{esc(label)}</text></g>')
    out.append(f'<text class="lbl" x="{left + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">'
               f"{esc(xlabel)}</text>")
    ylab = f"{ylabel} (log scale)" if log_y else ylabel
    out.append(f'<text class="lbl" transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{esc(ylab)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def html_document(title: str, body: str) -> str:
    """A complete, self-contained page (inline CSS only)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{esc(title)}</h1>\n{body}\n</body>\n</html>\n")


def table(rows: Iterable[Sequence[object]], header: Sequence[str] | None = None, css: str = "") -> str:
    """A small HTML table; cells are escaped, numbers right-aligned."""
    parts = [f'<table class="{esc(css)}">' if css else "<table>"]
    if header:
        parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for v in row:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{esc(fmt(v))}</td>')
            else:
                cells.append(f"<td>{esc(v)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------
# The latent page
# ------------------------------------------------------------------------------------------------


@dataclass
class Snippet:
    """One top activation: the token at (seq, pos) with its context, as decoded token strings."""

    value: float
    token: str
    left: list[str]
    right: list[str]
    seq: int  # sequence index in the token set
    pos: int  # position in the sequence
    row: int  # row in the activation arrays (seq * context_length + pos)


@dataclass
class LatentCard:
    latent: int
    label: str  # class or group, shown beside the id
    headline: str = ""  # one short line in the summary, e.g. "r = 0.97"
    facts: list[tuple[str, object]] = field(default_factory=list)
    snippets: list[Snippet] = field(default_factory=list)


@dataclass
class LatentGroup:
    title: str
    note: str = ""
    cards: list[LatentCard] = field(default_factory=list)


def _snippet_html(s: Snippet) -> str:
    left = esc("".join(display_token(t) for t in s.left))
    right = esc("".join(display_token(t) for t in s.right))
    return (f'<li class="snippet" data-row="{s.row}" data-value="{s.value!r}" '
            f'title="sequence {s.seq}, position {s.pos}"><span class="act">{esc(fmt(s.value))}</span>'
            f'<span class="ctx">{left}</span><mark>{esc(display_token(s.token))}</mark>'
            f'<span class="ctx">{right}</span></li>')


def _card_html(card: LatentCard, open_: bool, browser: str | None = None) -> str:
    head = f' \u00b7 {esc(card.headline)}' if card.headline else ""
    if browser:
        head += f' <a class="browse" href="{esc(browser)}/latent.html#{card.latent}">browse \u2192</a>'
    facts = table([(k, v) for k, v in card.facts], css="facts") if card.facts else ""
    if card.snippets:
        snippets = '<ol class="snippets">' + "".join(_snippet_html(s) for s in card.snippets) + "</ol>"
    else:
        snippets = '<p class="empty">never active on the tokens scanned</p>'
    return (f'<details class="latent" id="latent-{card.latent}" data-latent="{card.latent}"'
            f'{" open" if open_ else ""}><summary>Latent {card.latent}<span class="cls">'
            f"{esc(card.label)}{head}</span></summary>{facts}{snippets}</details>")


def render_latent_page(title: str, summary: Sequence[tuple[str, object]], groups: Sequence[LatentGroup],
                       *, figures: Sequence[str] = (), counts: dict[str, int] | None = None,
                       open_cards: int = 5, browser: str | None = None) -> str:
    """The whole page as a string: summary table, class counts, figures (inline SVG), then one
    section per group with a collapsible card per latent (the first `open_cards` expanded).
    `browser`: the latent browser's folder relative to the page (evals/browser), linked from the
    top and from every card."""
    body = ['<section id="summary">', table(summary, css="summary")]
    if browser:
        body.insert(0, f'<p class="note"><a href="{esc(browser)}/index.html">Every latent in the latent browser '
                       f'\u2192</a></p>')
    if counts:
        body.append("<h3>Latents per class</h3>")
        body.append(table(sorted(counts.items(), key=lambda kv: -kv[1]), header=("class", "latents"),
                          css="counts"))
    body.append("</section>")
    if figures:
        body.append('<section id="figures">' + "".join(f"<figure>{f}</figure>" for f in figures)
                    + "</section>")
    if groups:
        body.append("<nav>" + "".join(f'<a href="#group-{i}">{esc(g.title)} ({len(g.cards)})</a>'
                                      for i, g in enumerate(groups)) + "</nav>")
    for i, g in enumerate(groups):
        body.append(f'<section class="group" id="group-{i}"><h2>{esc(g.title)}</h2>')
        if g.note:
            body.append(f'<p class="note">{esc(g.note)}</p>')
        body.extend(_card_html(c, j < open_cards, browser) for j, c in enumerate(g.cards))
        if not g.cards:
            body.append('<p class="empty">no latents</p>')
        body.append("</section>")
    return html_document(title, "\n".join(body))


def write_latent_page(path: str | Path, title: str, summary: Sequence[tuple[str, object]],
                      groups: Sequence[LatentGroup], **kwargs) -> Path:
    """Write `render_latent_page(...)` to `path` (UTF-8) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_latent_page(title, summary, groups, **kwargs))
    return path
