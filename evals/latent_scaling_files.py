"""Latent Scaling's files: the per-latent CSV and the nu_epsilon-against-nu_r figure.

The figure is the paper's view of the exclusive latents: a latent truly new in the fine-tuned model
sits near the origin (its direction is neither in the base model's error nor in its reconstruction),
complete shrinkage lifts nu_epsilon, latent decoupling moves nu_r right. The other live latents
are drawn in grey for reference. Values outside the axes are drawn on the border.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.records import atomic_write_text

from .analysis_specs import LatentScalingSpec
from .plots import figure

if TYPE_CHECKING:
    from .latent_scaling import PairScaling

CSV_COLUMNS = ("latent", "base", "ft", "nu_epsilon", "nu_r", "class", "beta_error_base", "beta_error_ft",
               "beta_recon_base", "beta_recon_ft", "relative_norm", "delta", "norm_base", "norm_ft",
               "active_tokens")
_COLORS = {"genuine": "#2ca02c", "shrinkage": "#d62728", "decoupling": "#ff7f0e",
           "shrinkage+decoupling": "#9467bd"}
_VIEW = (-0.25, 1.5)  # nu axes: the interesting range is [0, 1]


def _num(v: float) -> str:
    return f"{v:.6g}" if np.isfinite(v) else "nan"


def write_scaling_csv(path: str | Path, pairs: Sequence[PairScaling]) -> Path:
    """One row per (pair, latent): the columns of CSV_COLUMNS; NaN where a value is undefined."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for p in pairs:
        cols = [p.nu_epsilon, p.nu_r, p.beta_error_base, p.beta_error_ft, p.beta_recon_base, p.beta_recon_ft,
                p.relative, p.delta, p.norm_base, p.norm_ft]
        for j in range(len(p.classes)):
            ne, nr, *rest = (_num(c[j]) for c in cols)
            w.writerow([j, p.base, p.ft, ne, nr, p.classes[j], *rest, int(p.active[j])])
    path = Path(path)
    atomic_write_text(path, buf.getvalue())
    return path


def write_scaling_plot(path: str | Path, pairs: Sequence[PairScaling], spec: LatentScalingSpec, *,
                       title: str = "") -> Path:
    """One panel per pair: nu_r (x) against nu_epsilon (y), exclusive latents coloured by class,
    the genuine region's thresholds dashed."""
    fig, axes = figure(1, len(pairs), size=(5.2, 4.6))
    lo, hi = _VIEW
    for ax, p in zip(axes[0], pairs):
        finite = np.isfinite(p.nu_epsilon) & np.isfinite(p.nu_r)
        rest = finite & ~np.isin(p.classes, list(_COLORS))
        ax.scatter(np.clip(p.nu_r[rest], lo, hi), np.clip(p.nu_epsilon[rest], lo, hi), s=4, color="#bbbbbb",
                   lw=0, label=f"other live latents ({int(rest.sum())})")
        for cls, color in _COLORS.items():
            sel = finite & (p.classes == cls)
            if sel.any():
                ax.scatter(np.clip(p.nu_r[sel], lo, hi), np.clip(p.nu_epsilon[sel], lo, hi), s=14, color=color,
                           lw=0, label=f"{cls} ({int(sel.sum())})")
        n_excl = int(sum((p.classes == c).sum() for c in _COLORS))
        ax.axhline(spec.nu_epsilon_max, color="#555", ls="--", lw=0.8)
        ax.axvline(spec.nu_r_max, color="#555", ls="--", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"nu_r = beta({p.base} recon) / beta({p.ft} recon)")
        ax.set_ylabel(f"nu_epsilon = beta({p.base} error) / beta({p.ft} error)")
        head = f"{title}: " if title else ""
        ax.set_title(f"{head}{p.ft} vs {p.base}: {n_excl} latents with Delta >= {spec.exclusive_delta}",
                     fontsize=9)
        ax.legend(loc="upper right", fontsize=7, frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
