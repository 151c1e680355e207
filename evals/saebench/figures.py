"""The study's three figures, drawn from the comparison rows (evals/saebench/table.py) with the
project's figure helper (a matplotlib Figure on the Agg canvas: no pyplot, no display):

* `metrics.png`: a 2x2 comparison per dictionary: explained variance, KL score, L0, and the
  absorption fraction (L1 when no dictionary has an absorption score);
* `absorption.png`: mean absorption fraction and full-absorption rate per dictionary, with the
  standard deviation over letters;
* `probing.png`: sparse-probing test accuracy against k, one line per SAE, and the model's own
  top-k residual dimensions (dashed) and all dimensions (dotted) as the baselines.

A dictionary without a value (no score, a crosscoder) gets no bar; a figure with nothing to show
says so in its title instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from evals.plots import figure

COLORS = {"topk": "#2ca02c", "batchtopk": "#9467bd", "relu": "#1f77b4", "jumprelu": "#ff7f0e"}


def _value(r: dict, key: str) -> float | None:
    v = r.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _label(r: dict) -> str:
    return r["dictionary"] if not r.get("crosscoder") else f"{r['dictionary']}\n({r['model']})"


def _bars(ax, rows: Sequence[dict], key: str, title: str, *, err: str | None = None, offset: float = 0.0,
          width: float = 0.8, color=None, label=None) -> bool:
    xs, ys, es, cs = [], [], [], []
    for i, r in enumerate(rows):
        v = _value(r, key)
        if v is not None:
            xs.append(i + offset)
            ys.append(v)
            es.append(_value(r, err) or 0.0 if err else 0.0)
            cs.append(color or COLORS.get(r.get("architecture"), "#7f7f7f"))
    ax.bar(xs, ys, width=width, color=cs, yerr=es if err else None, capsize=3, label=label)
    ax.set_xticks(range(len(rows)), [_label(r) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_title(title if xs else f"{title}: no values")
    return bool(xs)


def metrics_figure(rows: Sequence[dict], path: Path) -> Path:
    fig, axes = figure(2, 2, size=(max(4.0, 0.7 * len(rows) + 2), 3.2))
    _bars(axes[0][0], rows, "explained_variance", "explained variance (pooled)")
    _bars(axes[0][1], rows, "kl_div_score", "KL divergence score")
    _bars(axes[1][0], rows, "l0", "L0 (active latents per token)")
    if any(_value(r, "mean_absorption_fraction_score") is not None for r in rows):
        _bars(axes[1][1], rows, "mean_absorption_fraction_score", "mean absorption fraction (lower is better)")
    else:
        _bars(axes[1][1], rows, "l1", "L1 (sum of codes per token)")
    fig.savefig(path, dpi=110)
    return path


def absorption_figure(rows: Sequence[dict], path: Path) -> Path:
    fig, axes = figure(1, 1, size=(max(5.0, 0.8 * len(rows) + 2), 3.8))
    ax = axes[0][0]
    _bars(ax, rows, "mean_absorption_fraction_score", "absorption per dictionary", err="std_dev_absorption_fraction_score",
          offset=-0.2, width=0.4, color="#4c78a8", label="mean absorption fraction")
    has = _bars(ax, rows, "mean_full_absorption_score", "absorption per dictionary",
                err="std_dev_full_absorption_score", offset=0.2, width=0.4, color="#e45756",
                label="full-absorption rate")
    ax.set_ylabel("over scored letters (± std)")
    if has:
        ax.legend(fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    return path


def probing_figure(rows: Sequence[dict], ks: Sequence[int], path: Path) -> Path:
    fig, axes = figure(1, 1, size=(6.5, 4.0))
    ax = axes[0][0]
    drawn = False
    for r in rows:
        pts = [(k, _value(r, f"sae_top_{k}_test_accuracy")) for k in ks]
        pts = [(k, v) for k, v in pts if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=_label(r).replace("\n", " "),
                    color=COLORS.get(r.get("architecture")))
            drawn = True
    base = next((r for r in rows if _value(r, f"llm_top_{ks[0]}_test_accuracy") is not None), None) if ks else None
    if base is not None:
        pts = [(k, _value(base, f"llm_top_{k}_test_accuracy")) for k in ks]
        ax.plot(*zip(*pts), ls="--", color="black", label="model: top-k dimensions")
        if _value(base, "llm_test_accuracy") is not None:
            ax.axhline(base["llm_test_accuracy"], ls=":", color="black", label="model: all dimensions")
    ax.set_xscale("log")
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.set_xlabel("k (latents or dimensions)")
    ax.set_ylabel("test accuracy (mean over tasks and datasets)")
    ax.set_title("sparse probing" if drawn else "sparse probing: no results")
    if drawn:
        ax.legend(fontsize=7, frameon=False)
    fig.savefig(path, dpi=110)
    return path


def draw(rows: Sequence[dict], ks: Sequence[int], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    return {"metrics": metrics_figure(rows, out / "metrics.png"),
            "absorption": absorption_figure(rows, out / "absorption.png"),
            "probing": probing_figure(rows, ks, out / "probing.png")}
