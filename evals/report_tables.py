"""The report's tables: aggregated rows (evals/report_rows.py) as CSV, Markdown and LaTeX.

``report.csv`` holds every aggregated metric, mean and std in separate columns; ``report.md`` a
readable table (also printed on the terminal); ``report.tex`` a booktabs table in the layout of
the usual crosscoder statistics table. A missing value or the std of a single seed shows as "–"
in Markdown and "--" in LaTeX; an unknown training dead count as "unknown" (Markdown) and "?"
(LaTeX). The captions say what "dead" and "silent" count and which conventions the rows used.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from pipeline.records import atomic_write_text

from .report_rows import CONVENTIONS, GLOBAL_METRICS, PER_MODEL_METRICS, Row, arch_rank, model_letter

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
MD_UNKNOWN, TEX_UNKNOWN = "unknown", "?"  # a training dead count the dictionary does not record

DEAD_NOTE = ("dead: latents silent for dead_after_tokens training tokens when training ended (the "
             "trainer's count; unknown where the dictionary does not record it); silent: latents that "
             "never fired on the evaluated tokens (silent_on_eval_tokens in report.csv: far fewer tokens, "
             "so rare latents count as silent)")
_CONVENTION_NOTES = {
    "transfer_units": ("SAEs run on other models were fed their activations in {} units "
                       "(source: the SAE's model's, stored rows x s_A / s_B; stored: each model's own)"),
    "class_convention": ("Crosscoder latent classes by relative decoder norm {} (r = |d_B| / (|d_A| + |d_B|), "
                         "Anthropic / Kissane et al.; delta = 1/2 ((|d_B| - |d_A|) / max + 1), Minder et al.; "
                         "dead latents left out)"),
}

# Display names of dictionary types in LaTeX.
_ARCH_LATEX = {"relu": r"ReLU ($\ell_1$)", "topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU"}


def _max_models(rows: Sequence[Row]) -> int:
    return max((len(r.models) for r in rows), default=0)


def csv_columns(rows: Sequence[Row]) -> list[str]:
    """The CSV header for ``rows``: identification columns, then <metric>_mean / <metric>_std."""
    letters = [model_letter(i) for i in range(_max_models(rows))]
    cols = ["experiment", "comparison", "hook", "architecture", "dictionary", "n_seeds", "seeds", "dictionaries"]
    cols += [f"model_{x}" for x in letters]
    cols += list(CONVENTIONS)
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
        line.update(r.conventions)
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


def _dead(r: Row, fmt: str, missing: str, unknown: str, pm: str) -> str:
    """The training dead count; `unknown` when no member of the row records it."""
    mean = r.mean("dead_latents")
    return unknown if math.isnan(mean) else _pm(mean, r.std("dead_latents"), fmt, missing, pm)


def conventions_note(rows: Sequence[Row]) -> str:
    """One sentence per convention the rows used (transfer units, relative-norm classes), "" if none."""
    notes = []
    for key, text in _CONVENTION_NOTES.items():
        used = sorted({v for r in rows for v in r.conventions.get(key, "").split(";") if v})
        if used:
            notes.append(text.format(" / ".join(used)) + ".")
    return " ".join(notes)


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
    silent | ΔCE A | ΔCE B | ΔCE C | seeds, cells "mean ± std" (L0 2 decimals, dead and silent 1,
    ΔCE 3); dead is "unknown" where the dictionaries do not record it."""
    letters = [model_letter(i) for i in range(max(3, _max_models(rows)))]
    head = ["experiment", "comparison", "dictionary", "L0", "dead", "silent"] + [f"ΔCE {x}" for x in letters]
    head += ["seeds"]
    align = ["---", "---", "---", "---:", "---:", "---:"] + ["---:"] * len(letters) + ["---:"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for r, label in zip(rows, _display_labels(rows)):
        cells = [
            r.experiment,
            r.comparison,
            label,
            _pm(r.mean("l0"), r.std("l0"), ".2f", MD_MISSING, " ± "),
            _dead(r, ".1f", MD_MISSING, MD_UNKNOWN, " ± "),
            _pm(r.mean("silent_on_eval"), r.std("silent_on_eval"), ".1f", MD_MISSING, " ± "),
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
        f"L0: active latents per token; {DEAD_NOTE}; ΔCE A/B/C: increase in "
        "cross-entropy loss when the reconstruction is spliced into the 1st/2nd/3rd model of the "
        "comparison. Every aggregated metric (explained variance, CE-loss score, KL, l1, frac_alive) is "
        "in report.csv. " + conventions_note(rows)
    ).rstrip() + "\n"
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
    """A booktabs table: Model | Comparison | L0 | Dead | Silent | ΔCE A | ΔCE B | ΔCE C.

    Grouped by dictionary type (a title row, then its rows; \\midrule between types). Model is the
    experiment (plus the hook where an experiment has several), written only on the first row of its
    block. Cells: ``mean $\\pm$ std`` (2 decimals; dead and silent latents as integers; ``?`` for
    an unknown dead count); ``--`` where there is no value (ΔCE C of a 2-model comparison) and as
    the std of a single seed. Needs only booktabs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_ce = max(3, _max_models(rows))
    letters = [model_letter(i) for i in range(n_ce)]
    n_cols = 5 + n_ce
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
                _dead(r, ".0f", TEX_MISSING, TEX_UNKNOWN, r" $\pm$ "),
                _pm(r.mean("silent_on_eval"), r.std("silent_on_eval"), ".0f", TEX_MISSING, r" $\pm$ "),
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
            (rf"    \textbf{{Model}} & \textbf{{Comparison}} & \textbf{{$\ell_0$}} & \textbf{{Dead}} & "
             rf"\textbf{{Silent}} & {ce_head} \\"),
            r"    \midrule",
            *body,
            r"    \bottomrule",
            r"  \end{tabular}",
            (rf"  \caption{{\textbf{{Dictionary statistics.}} Mean $\pm$ sample standard deviation over {over}. "
            rf"$\ell_0$: active latents per token; Dead: latents silent for the last dead\_after\_tokens training "
            rf"tokens (?: not recorded); Silent: latents that never fired on the evaluated tokens. "
            rf"{latex_escape(conventions_note(rows))} $\Delta$CE is the increase in "
            rf"cross-entropy loss when the dictionary's reconstruction replaces the activation; {which} refer to "
            rf"the 1st, 2nd, 3rd model of the comparison. --: not applicable (a single seed has no std).}}"),
            r"  \label{tab:dictionary-stats}",
            r"\end{table}",
            "",
        ]
    )
    atomic_write_text(path, text)
    return path
