"""The analyses' figures: decoder-norm histograms (PNG and inline SVG) and the firing-frequency
scatter of an SAE on two models.

`figure` makes every PNG here, and the toy study's and the ground-truth plots: a matplotlib Figure
on the Agg canvas, so plotting never touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.records import atomic_write_text

from . import latent_page as P
from .activations import ActivationStats
from .decoder_norms import DELTA, FORMULAS, SHARED, NormAnalysis, R, only


def figure(n_rows: int = 1, n_cols: int = 1, size=(7.0, 3.6)):
    """A matplotlib Figure with the Agg canvas: no pyplot, no global backend, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * n_cols, size[1] * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    return fig, axes


def _norm_marks(a: NormAnalysis) -> list[tuple[float, str]]:
    t = a.thresholds
    if a.n_models == 2:
        c = a.convention
        return [(t["specific_below"], f"{only(a.model_names[0])}: {c} below"),
                (t["shared_band"][0], f"shared: {c} from"), (t["shared_band"][1], f"shared: {c} to"),
                (t["specific_above"], f"{only(a.model_names[1])}: {c} above")]
    return [(t["shared_min_share"], "shared: every share above"),
            (t["specific_above"], "specific above")]


def norm_axis_label(convention: str, a_name: str = "A", b_name: str = "B") -> str:
    """The axis label of one relative-norm convention, with the models' names in the formula."""
    return FORMULAS[convention].replace("d_A", f"d_{a_name}").replace("d_B", f"d_{b_name}")


def _hist_png(ax, values: np.ndarray, edges: np.ndarray, *, title: str, xlabel: str, log_y: bool,
              marks: Sequence[tuple[float, str]] = (), spans: Sequence[tuple[float, float, str, str]] = ()):
    for lo, hi, color, label in spans:
        ax.axvspan(lo, hi, color=color, alpha=0.12, lw=0, label=label)
    ax.hist(values, bins=edges, color="#4c78a8")
    for x, label in marks:
        ax.axvline(x, color="#d62728", ls="--", lw=0.9)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latents" + (" (log scale)" if log_y else ""))
    if spans:
        ax.legend(loc="upper center", fontsize=8, frameon=False, ncol=len(spans))


@dataclass
class _Panel:
    values: np.ndarray
    edges: np.ndarray
    title: str
    xlabel: str
    marks: list = field(default_factory=list)
    spans: list = field(default_factory=list)


def _norm_panels(a: NormAnalysis, bins: int, head: str) -> list[_Panel]:
    """Two models: the classes' relative norm with the class regions, then the other convention's;
    more: one share histogram per model. Dead latents left out, and counted in the title."""
    alive = ~a.dead
    edges = np.linspace(0.0, 1.0, bins + 1)
    left_out = f"{int(a.dead.sum())} dead left out"
    if a.n_models == 2:
        (na, nb), t, c = a.model_names, a.thresholds, a.convention
        spans = [(0, t["specific_below"], "#d62728", only(na)),
                 (t["shared_band"][0], t["shared_band"][1], "#2ca02c", SHARED),
                 (t["specific_above"], 1, "#9467bd", only(nb))]
        other = DELTA if c == R else R
        return [_Panel(a.values(c)[alive], edges,
                       f"{head}relative decoder norm {c}, classes ({int(alive.sum())} latents, {left_out})",
                       norm_axis_label(c, na, nb), _norm_marks(a), spans),
                _Panel(a.values(other)[alive], edges,
                       f"{head}relative decoder norm {other}, for comparison ({int(alive.sum())} latents)",
                       norm_axis_label(other, na, nb))]
    return [_Panel(a.shares[alive, i], edges, f"{head}decoder norm share of {name} ({left_out})",
                   f"|d_{name}| / sum of decoder norms", _norm_marks(a)) for i, name in enumerate(a.model_names)]


def _cosine_panel(a: NormAnalysis, bins: int, head: str) -> _Panel:
    pair = "cos(d_A, d_B)" if a.n_models == 2 else "mean pairwise cosine"
    cos = a.shared_cosine
    return _Panel(cos, np.linspace(-1.0, 1.0, bins + 1),
                  f"{head}decoder cosine similarity of {cos.size} shared latents",
                  f"{pair} of the decoder vectors")


def _svg(p: _Panel, log_y: bool, height: int = 300) -> str:
    counts, _ = np.histogram(p.values, bins=p.edges)
    return P.svg_histogram(counts, p.edges, title=p.title, xlabel=p.xlabel, log_y=log_y, marks=p.marks,
                           height=height)


def norm_svgs(a: NormAnalysis, *, log_y: bool = False, cosine_log_y: bool = True, bins: int = 100,
              title: str = "") -> list[str]:
    """The relative-norm (n > 2: per-model share) histograms and the shared-latent cosine
    histogram as inline SVG with hover tooltips."""
    head = f"{title}: " if title else ""
    panels = _norm_panels(a, bins, head)
    height = 300 if len(panels) == 1 else 250
    return [_svg(p, log_y, height) for p in panels] + [_svg(_cosine_panel(a, bins, head), cosine_log_y)]


def write_norm_plots(a: NormAnalysis, out_dir: str | Path, *, log_y: bool = False, bins: int = 100,
                     cosine_log_y: bool = True, title: str = "") -> dict[str, Path]:
    """relative_norms.png, shared_cosine.png and relative_norms.html (the same histograms as SVG).

    Two models: the histogram of the classes' relative norm (`[eval] relative_norm`: r or delta)
    with the class thresholds marked and the class regions shaded, then the other convention's
    histogram. More models: one histogram of the shares per model. Dead latents are left out.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = f"{title}: " if title else ""
    paths = {"relative_norms_png": out / "relative_norms.png", "shared_cosine_png": out / "shared_cosine.png",
             "relative_norms_html": out / "relative_norms.html"}
    panels = _norm_panels(a, bins, head)
    fig, axes = figure(len(panels), 1, size=(7.0, 3.6 if len(panels) == 1 else 2.6))
    for ax, p in zip(axes[:, 0], panels):
        _hist_png(ax, p.values, p.edges, title=p.title, xlabel=p.xlabel, log_y=log_y, marks=p.marks,
                  spans=p.spans)
    fig.savefig(paths["relative_norms_png"], dpi=120)
    p = _cosine_panel(a, bins, head)
    fig, axes = figure()
    _hist_png(axes[0, 0], p.values, p.edges, title=p.title, xlabel=p.xlabel, log_y=cosine_log_y)
    fig.savefig(paths["shared_cosine_png"], dpi=120)

    svgs = norm_svgs(a, log_y=log_y, cosine_log_y=cosine_log_y, bins=bins, title=title)
    body = (P.table(list(a.counts.items()), header=("class", "latents"), css="counts")
            + "".join(f"<figure>{s}</figure>" for s in svgs)
            + '<p class="note">Hover a bar for its bin and count. Dead latents (' + P.esc(a.dead_definition)
            + ") are left out of the histograms and the other classes. Thresholds: "
            + P.esc(json.dumps(a.thresholds)) + "</p>")
    atomic_write_text(paths["relative_norms_html"], P.html_document(f"{head}decoder norms", body))
    return paths


def write_activation_scatter(path: str | Path, stats: ActivationStats, a: str, others: Sequence[str], *,
                             highlight: Mapping[str, Sequence[int]] | None = None) -> Path:
    """Firing frequency on a vs on each b (one panel per b), log-log, with the diagonal. Latents
    that never fire on one side are drawn at 1/(2 n_tokens), below every real frequency."""
    fig, axes = figure(1, len(others), size=(4.6, 4.4))
    floor = 0.5 / max(stats.n_tokens, 1)
    for ax, b in zip(axes[0], others):
        fa, fb = stats.freq[stats.col(a)], stats.freq[stats.col(b)]
        live = (fa > 0) | (fb > 0)
        x, y = np.maximum(fa[live], floor), np.maximum(fb[live], floor)
        ax.scatter(x, y, s=5, alpha=0.5, color="#4c78a8", lw=0, label=f"{int(live.sum())} latents")
        hi = list((highlight or {}).get(b, []))
        if hi:
            ax.scatter(np.maximum(fa[hi], floor), np.maximum(fb[hi], floor), s=12, color="#d62728",
                       lw=0, label=f"top {len(hi)} by increase")
        lo_ = floor * 0.8
        ax.plot([lo_, 1], [lo_, 1], color="#555", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo_, 1.2)
        ax.set_ylim(lo_, 1.2)
        ax.set_xlabel(f"firing frequency on {a}")
        ax.set_ylabel(f"firing frequency on {b}")
        ax.set_title(f"{a} vs {b}")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
