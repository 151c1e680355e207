"""The study's comparison table: one row per SAE (per model, for a crosscoder's core metrics), as
CSV (every column, full precision) and Markdown (the columns a reader compares, printed too).
A value the study could not measure (absorption without enough scorable letters, a crosscoder's
absorption, a metric an older splice.json lacks) is empty in the CSV and "–" in Markdown."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from pipeline.records import atomic_write_text

MISSING = "–"
IDENTITY = ("dictionary", "model", "architecture", "k", "n_latents")
CORE = ("l0", "l1", "frac_alive", "explained_variance", "explained_variance_legacy", "mse", "cossim",
        "l2_ratio", "relative_reconstruction_bias", "kl_div_score", "ce_loss_score", "ce_loss_with_sae",
        "ce_loss_without_sae")
ABSORPTION = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
              "std_dev_absorption_fraction_score", "std_dev_full_absorption_score", "n_letters_scored")
# Markdown header -> row key
SHOWN = {"dictionary": "dictionary", "arch": "architecture", "L0": "l0", "L1": "l1", "EV": "explained_variance",
         "EV (legacy)": "explained_variance_legacy", "KL score": "kl_div_score", "CE score": "ce_loss_score",
         "absorption": "mean_absorption_fraction_score", "full abs.": "mean_full_absorption_score",
         "split": "mean_num_split_features"}


def probing_columns(ks: Sequence[int]) -> list[str]:
    return ([f"sae_top_{k}_test_accuracy" for k in ks] + ["sae_test_accuracy"]
            + [f"llm_top_{k}_test_accuracy" for k in ks] + ["llm_test_accuracy"])


def columns(ks: Sequence[int]) -> list[str]:
    return [*IDENTITY, *CORE, *ABSORPTION, *probing_columns(ks)]


def row(dictionary: str, model: str, meta: dict, core: dict, absorption: dict | None, probing: dict | None) -> dict:
    """A table row from one SAE's results (`core`: the model's splice metrics with l0, l1 and
    frac_alive beside them; `probing`: its {"mean": ...})."""
    spec = meta.get("spec") or {}
    out = {"dictionary": dictionary, "model": model, "architecture": meta.get("architecture"),
           "k": spec.get("k"), "n_latents": meta.get("n_latents"),
           "crosscoder": len(meta.get("models") or []) > 1}
    out.update({c: core.get(c) for c in CORE})
    out.update({c: (absorption or {}).get(c) for c in ABSORPTION})
    out.update((probing or {}).get("mean", {}))
    return out


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def write_csv(rows: Sequence[dict], ks: Sequence[int], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    cols = columns(ks)
    writer.writerow(cols)
    for r in rows:
        writer.writerow([_text(r.get(c)) for c in cols])
    atomic_write_text(path, buf.getvalue())
    return path


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def markdown(rows: Sequence[dict], ks: Sequence[int]) -> str:
    shown = dict(SHOWN)
    for k in [k for k in ks if k in (1, 5, 20)] or list(ks)[:3]:
        shown[f"probe@{k}"] = f"sae_top_{k}_test_accuracy"
    if ks:
        shown[f"LLM probe@{ks[0]}"] = f"llm_top_{ks[0]}_test_accuracy"
    lines = ["| " + " | ".join(shown) + " |", "|" + "|".join("---" for _ in shown) + "|"]
    for r in rows:
        name = r["dictionary"] if r.get("model") in (None, "") or not r.get("crosscoder") else \
            f"{r['dictionary']} ({r['model']})"
        cells = [name] + [_cell(r.get(key)) for key in list(shown.values())[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[dict], ks: Sequence[int], path: Path) -> str:
    text = markdown(rows, ks)
    atomic_write_text(path, text)
    return text
