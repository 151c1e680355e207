"""The report's tables: aggregated rows (evals/report_rows.py) as CSV, Markdown and LaTeX.

``report.csv`` holds every aggregated metric, mean and std in separate columns; ``report.md`` a
readable table (also printed on the terminal); ``report.tex`` a booktabs table in the layout of
the usual crosscoder statistics table. A missing value or the std of a single seed shows as "–"
in Markdown and "--" in LaTeX.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from pipeline.records import atomic_write_text

from .report_rows import GLOBAL_METRICS, PER_MODEL_METRICS, Row, arch_rank, model_letter

__all__ = [
    "csv_columns",
    "format_table",
    "latex_escape",
    "write_csv",
    "write_latex",
    "write_markdown",
]

MD_MISSING = "–"  # en dash: no std (single seed), no value, no such model
TEX_MISSING = "--"

# Display names of dictionary types in LaTeX.
_ARCH_LATEX = {"relu": r"ReLU ($\ell_1$)", "topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU"}


def _max_models(rows: Sequence[Row]) -> int:
    return max((len(r.models) for r in rows), default=0)


def csv_columns(rows: Sequence[Row]) -> list[str]:
    """The CSV header for ``rows``: identification columns, then <metric>_mean / <metric>_std."""
    letters = [model_letter(i) for i in range(_max_models(rows))]
    cols = ["experiment", "comparison", "hook", "architecture", "dictionary", "n_seeds", "seeds", "dictionaries"]
    cols += [f"model_{x}" for x in letters]
    metrics = list(GLOBAL_METRICS) + [f"{m}_{x}" for m in PER_MODEL_METRICS for x in letters]
    for m in metrics:
        cols += [f"{m}_mean", f"{m}_std"]
    return cols


def _csv_num(x: float) -> str:
    return "nan" if math.isnan(x) else repr(float(x))


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """One line per group. Numbers at full precision (repr); std of a single seed is "nan";
    cells of models a comparison does not have (e.g. model_C, ce_diff_C_mean for 2 models) are empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = csv_columns(rows)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        line = {
            "experiment": r.experiment,
            "comparison": r.comparison,
            "hook": r.hook,
            "architecture": r.architecture,
            "dictionary": r.label,
            "n_seeds": r.n_seeds,
            "seeds": ";".join("" if s is None else str(s) for s in r.seeds),
            "dictionaries": ";".join(r.dictionaries),
        }
        for x, model in zip(r.letters, r.models):
            line[f"model_{x}"] = model
        for metric, (mean, std) in r.stats.items():
            line[f"{metric}_mean"] = _csv_num(mean)
            line[f"{metric}_std"] = _csv_num(std)
        w.writerow({c: line.get(c, "") for c in cols})
    atomic_write_text(path, buf.getvalue())
    return path


def _pm(mean: float, std: float, fmt: str, missing: str, pm: str) -> str:
    if math.isnan(mean):
        return missing
    return f"{mean:{fmt}}{pm}{missing if math.isnan(std) else format(std, fmt)}"


def _display_labels(rows: Sequence[Row]) -> list[str]:
    """Row labels, with the hook (then a counter) appended where experiment, comparison and label
    alone would not tell two rows apart."""
    labels = [r.label for r in rows]
    for step in ("hook", "counter"):
        keys = [(r.experiment, r.models, labels[i]) for i, r in enumerate(rows)]
        dup = {k for k in keys if keys.count(k) > 1}
        if not dup:
            break
        for i, r in enumerate(rows):
            if keys[i] in dup:
                labels[i] = f"{r.label} @ {r.hook}" if step == "hook" else f"{labels[i]} #{i + 1}"
    return labels


def _md_cell(s: str) -> str:
    return str(s).replace("|", r"\|")


def format_table(rows: Sequence[Row]) -> str:
    """The Markdown table (also for the terminal): experiment | comparison | dictionary | L0 | dead |
    ΔCE A | ΔCE B | ΔCE C | seeds, cells "mean ± std" (L0 2 decimals, dead 1, ΔCE 3)."""
    letters = [model_letter(i) for i in range(max(3, _max_models(rows)))]
    head = ["experiment", "comparison", "dictionary", "L0", "dead"] + [f"ΔCE {x}" for x in letters] + ["seeds"]
    align = ["---", "---", "---", "---:", "---:"] + ["---:"] * len(letters) + ["---:"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for r, label in zip(rows, _display_labels(rows)):
        cells = [
            r.experiment,
            r.comparison,
            label,
            _pm(r.mean("l0"), r.std("l0"), ".2f", MD_MISSING, " ± "),
            _pm(r.mean("dead_latents"), r.std("dead_latents"), ".1f", MD_MISSING, " ± "),
        ]
        for x in letters:
            m = f"ce_diff_{x}"
            cells.append(_pm(r.mean(m), r.std(m), ".3f", MD_MISSING, " ± ") if x in r.letters else MD_MISSING)
        cells.append(str(r.n_seeds))
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[Row], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# Dictionary statistics\n\n"
        + format_table(rows)
        + "\nMean ± sample standard deviation over seeds (– : single seed, or no such model). "
        "L0: active latents per token; dead: latents that never fired; ΔCE A/B/C: increase in "
        "cross-entropy loss when the reconstruction is spliced into the 1st/2nd/3rd model of the "
        "comparison. Every aggregated metric (explained variance, CE-loss score, KL) is in report.csv.\n"
    )
    atomic_write_text(path, text)
    return path


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "#": r"\#",
    "_": r"\_",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in str(s))


def _tex_comparison(models: Sequence[str]) -> str:
    return r" vs.\ ".join(latex_escape(m) for m in models)


def write_latex(rows: Sequence[Row], path: Path) -> Path:
    """A booktabs table: Model | Comparison | L0 | Dead | ΔCE A | ΔCE B | ΔCE C.

    Grouped by dictionary type (a title row, then its rows; \\midrule between types). Model is the
    experiment (plus the hook where an experiment has several), written only on the first row of its
    block. Cells: ``mean $\\pm$ std`` (2 decimals; dead latents as integers); ``--`` where there is
    no value (ΔCE C of a 2-model comparison) and as the std of a single seed. Needs only booktabs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_ce = max(3, _max_models(rows))
    letters = [model_letter(i) for i in range(n_ce)]
    n_cols = 4 + n_ce
    pad = " &" * (n_cols - 1)

    hooks_per_exp: dict[str, set[str]] = {}
    for r in rows:
        hooks_per_exp.setdefault(r.experiment, set()).add(r.hook)
    exp_order = {e: i for i, e in enumerate(dict.fromkeys(r.experiment for r in rows))}
    ordered = sorted(
        rows, key=lambda r: (arch_rank(r.architecture), exp_order[r.experiment], r.hook)
    )  # stable: keeps aggregate()'s order within a block

    def model_cell(r: Row) -> str:
        name = latex_escape(r.experiment)
        return f"{name} ({latex_escape(r.hook)})" if len(hooks_per_exp[r.experiment]) > 1 else name

    body: list[str] = []
    archs = list(dict.fromkeys(r.architecture for r in ordered))
    for gi, arch in enumerate(archs):
        if gi:
            body.append(r"    \midrule")
        group = [r for r in ordered if r.architecture == arch]
        body.append(rf"    \textit{{{_ARCH_LATEX.get(arch, latex_escape(arch))}}}{pad} \\")
        cmp_keys = [(r.experiment, r.hook, r.models) for r in group]
        prev_block = None
        for r, ck in zip(group, cmp_keys):
            block = (r.experiment, r.hook)
            comp = _tex_comparison(r.models)
            if cmp_keys.count(ck) > 1:  # several dictionaries of this type on one comparison
                comp += f" ({latex_escape(r.label)})"
            cells = [
                model_cell(r) if block != prev_block else "",
                comp,
                _pm(r.mean("l0"), r.std("l0"), ".2f", TEX_MISSING, r" $\pm$ "),
                _pm(r.mean("dead_latents"), r.std("dead_latents"), ".0f", TEX_MISSING, r" $\pm$ "),
            ]
            for x in letters:
                m = f"ce_diff_{x}"
                cells.append(_pm(r.mean(m), r.std(m), ".2f", TEX_MISSING, r" $\pm$ ") if x in r.letters else TEX_MISSING)
            body.append("    " + " & ".join(cells) + r" \\")
            prev_block = block

    seeds = sorted({r.n_seeds for r in rows})
    over = f"{seeds[0]} seed{'s' if seeds[0] != 1 else ''}" if len(seeds) == 1 else "seeds (number per row in report.csv)"
    ce_head = " & ".join(rf"\textbf{{$\Delta$CE {x}}}" for x in letters)
    which = ", ".join(f"{x}" for x in letters)
    text = "\n".join(
        [
            r"% Written by evals/report.py. Requires \usepackage{booktabs}.",
            r"\begin{table}[t]",
            r"  \centering",
            rf"  \begin{{tabular}}{{ll{'c' * (n_cols - 2)}}}",
            r"    \toprule",
            rf"    \textbf{{Model}} & \textbf{{Comparison}} & \textbf{{$\ell_0$}} & \textbf{{Dead}} & {ce_head} \\",
            r"    \midrule",
            *body,
            r"    \bottomrule",
            r"  \end{tabular}",
            (rf"  \caption{{\textbf{{Dictionary statistics.}} Mean $\pm$ sample standard deviation over {over}. "
            rf"$\ell_0$: active latents per token; Dead: latents that never fired. $\Delta$CE is the increase in "
            rf"cross-entropy loss when the dictionary's reconstruction replaces the activation; {which} refer to "
            rf"the 1st, 2nd, 3rd model of the comparison. --: not applicable (a single seed has no std).}}"),
            r"  \label{tab:dictionary-stats}",
            r"\end{table}",
            "",
        ]
    )
    atomic_write_text(path, text)
    return path
