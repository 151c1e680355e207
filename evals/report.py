"""Stage three's report: aggregate every dictionary's ``splice.json`` over seeds into tables.

Input (written by ``mdiff eval``): one file per evaluated dictionary at
``<eval_dir>/<dictionary name>/splice.json``. Runs that differ only in their seed (and name) form a
group; each group becomes one row with the mean and the sample standard deviation (ddof=1) over its
seeds. A group with a single seed has std nan (shown as "–" in Markdown, "--" in LaTeX).

Outputs: ``report.csv`` (every aggregated metric, mean and std in separate columns),
``report.md`` (a readable table) and ``report.tex`` (a booktabs table in the layout of the usual
crosscoder statistics table). Plain Python and numpy only.

    from evals.report import write_report, collect, aggregate, format_table
    paths = write_report([Path("runs/x/evals")], Path("runs/x/report"))
    print(format_table(aggregate(collect([Path("runs/x/evals")]))))
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import string
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "GLOBAL_METRICS",
    "PER_MODEL_METRICS",
    "Row",
    "aggregate",
    "collect",
    "csv_columns",
    "format_table",
    "latex_escape",
    "model_letter",
    "write_csv",
    "write_latex",
    "write_markdown",
    "write_report",
]

SPLICE_FILE = "splice.json"

# Aggregated metrics. Global ones come from record["metrics"][name]; per-model ones from
# record["metrics"]["per_model"][model][name] and are named f"{name}_{letter}" (A = 1st model, ...).
GLOBAL_METRICS = ("l0", "dead_latents", "explained_variance")
PER_MODEL_METRICS = ("ce_diff", "ce_loss_score", "kl_div_with_sae", "explained_variance")

# Order of dictionary types in the tables, and their display names (LaTeX / plain).
_ARCH_ORDER = ("relu", "topk", "batchtopk", "jumprelu")
_ARCH_LATEX = {"relu": r"ReLU ($\ell_1$)", "topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU"}

_SEED_SUFFIX = re.compile(r"[-_](?:s|seed)\d+$")
_REQUIRED_KEYS = ("dictionary", "experiment", "architecture", "models", "metrics")

MD_MISSING = "–"  # en dash: no std (single seed), no value, no such model
TEX_MISSING = "--"


def model_letter(i: int) -> str:
    """Column letter of the i-th model of a comparison: A, B, C, ... (then M27, M28, ...)."""
    return string.ascii_uppercase[i] if i < len(string.ascii_uppercase) else f"M{i + 1}"


# ----------------------------------------------------------------------------------------------
# collect


def _as_dirs(eval_dirs) -> list[Path]:
    if isinstance(eval_dirs, (str, Path)):
        eval_dirs = [eval_dirs]
    return [Path(d) for d in eval_dirs]


def collect(eval_dirs: list[Path]) -> list[dict]:
    """Load every ``<dir>/*/splice.json`` under each of ``eval_dirs`` (one experiment's eval dir each).

    Returns the records in directory order (then sorted by path); each gets an extra key
    ``"_path"`` (str) naming its file. A file reached twice (overlapping arguments) is loaded once.
    Raises FileNotFoundError if no splice.json is found, ValueError for an unreadable or
    incomplete file.
    """
    dirs = _as_dirs(eval_dirs)
    records: list[dict] = []
    seen: set[Path] = set()
    for d in dirs:
        if not d.is_dir():
            continue
        for path in sorted(d.glob(f"*/{SPLICE_FILE}")):
            real = path.resolve()
            if real in seen or not path.is_file():
                continue
            seen.add(real)
            records.append(_load(path))
    if not records:
        where = ", ".join(f"{d}" + ("" if d.is_dir() else " (does not exist)") for d in dirs) or "(no directories given)"
        raise FileNotFoundError(
            f"no {SPLICE_FILE} found in {where}: expected <eval dir>/<dictionary name>/{SPLICE_FILE}. "
            f"Run `mdiff eval CONFIG` first."
        )
    return records


def _load(path: Path) -> dict:
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read splice results: {e}") from e
    if not isinstance(rec, dict):
        raise TypeError(f"{path}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in rec]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}; was it written by `mdiff eval`?")
    if not isinstance(rec["models"], list) or not rec["models"]:
        raise ValueError(f"{path}: 'models' must be a non-empty list")
    if not isinstance(rec["metrics"], dict):
        raise TypeError(f"{path}: 'metrics' must be an object")
    rec["_path"] = str(path)
    return rec


# ----------------------------------------------------------------------------------------------
# aggregate


@dataclass(frozen=True, eq=False)
class Row:
    """One group of runs that differ only in seed: means and sample stds over the seeds.

    ``stats`` maps a metric name to (mean, std): the GLOBAL_METRICS by name and the
    PER_MODEL_METRICS as f"{name}_{letter}", letter = model_letter(position in ``models``).
    std is nan for a single seed; mean is nan where a run lacks the value.
    """

    experiment: str
    models: tuple[str, ...]
    hook: str
    architecture: str
    label: str  # the dictionary name without its seed suffix
    dictionaries: tuple[str, ...]  # member names, by seed
    seeds: tuple[int | None, ...]
    spec: dict = field(default_factory=dict)  # shared DictionarySpec fields (without name and seed)
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def n_seeds(self) -> int:
        return len(self.dictionaries)

    @property
    def comparison(self) -> str:
        return " vs. ".join(self.models)

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(model_letter(i) for i in range(len(self.models)))

    def model(self, letter: str) -> str | None:
        """The model name behind column ``letter`` (None if this comparison has no such model)."""
        return dict(zip(self.letters, self.models)).get(letter)

    def mean(self, metric: str) -> float:
        return self.stats.get(metric, (math.nan, math.nan))[0]

    def std(self, metric: str) -> float:
        return self.stats.get(metric, (math.nan, math.nan))[1]


def _float(x) -> float:
    if isinstance(x, bool) or x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _seed(rec: dict):
    s = rec.get("seed", (rec.get("spec") or {}).get("seed"))
    return s if isinstance(s, int) and not isinstance(s, bool) else None


def _group_key(rec: dict) -> tuple:
    spec = {k: v for k, v in (rec.get("spec") or {}).items() if k not in ("name", "seed")}
    return (
        rec["experiment"],
        tuple(rec["models"]),
        rec.get("hook") or "",
        rec["architecture"],
        json.dumps(spec, sort_keys=True, default=str),
    )


def _label(name: str) -> str:
    stripped = _SEED_SUFFIX.sub("", name)
    return stripped or name


def _values(rec: dict, metric: str, model: str | None) -> float:
    metrics = rec["metrics"]
    if model is None:
        return _float(metrics.get(metric))
    per = (metrics.get("per_model") or {}).get(model) or {}
    v = _float(per.get(metric))
    if math.isnan(v) and metric == "ce_diff":  # top-level copy in the contract
        v = _float((rec.get("ce_diff") or {}).get(model))
    return v


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    mean = float(np.mean(a))
    std = float(np.std(a, ddof=1)) if a.size > 1 else math.nan
    return mean, std


def _arch_rank(arch: str) -> tuple[int, str]:
    return (_ARCH_ORDER.index(arch), "") if arch in _ARCH_ORDER else (len(_ARCH_ORDER), arch)


def aggregate(records: Iterable[dict]) -> list[Row]:
    """Group runs that differ only in seed and name; mean and sample std (ddof=1) over seeds.

    Group key: (experiment, models, hook, architecture, spec without "name" and "seed").
    Rows are ordered by experiment (first appearance), architecture (relu, topk, batchtopk,
    jumprelu, others), hook, number of models, comparison (first appearance), label.
    """
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(_group_key(rec), []).append(rec)

    exp_order: dict[str, int] = {}
    cmp_order: dict[tuple, int] = {}
    for key in groups:
        exp_order.setdefault(key[0], len(exp_order))
        cmp_order.setdefault(key[1], len(cmp_order))

    rows = []
    for (experiment, models, hook, arch, spec_json), members in groups.items():
        members = sorted(members, key=lambda r: (_seed(r) is None, _seed(r) or 0, r["dictionary"]))
        seeds = tuple(_seed(r) for r in members)
        known = [s for s in seeds if s is not None]
        if len(set(known)) < len(known):
            warnings.warn(
                f"{experiment}/{members[0]['dictionary']}: seeds {sorted(known)} repeat within one group "
                f"({', '.join(r.get('_path', r['dictionary']) for r in members)}); averaging them all",
                stacklevel=2,
            )
        stats = {m: _mean_std([_values(r, m, None) for r in members]) for m in GLOBAL_METRICS}
        for m in PER_MODEL_METRICS:
            for i, model in enumerate(models):
                stats[f"{m}_{model_letter(i)}"] = _mean_std([_values(r, m, model) for r in members])
        rows.append(
            Row(
                experiment=experiment,
                models=models,
                hook=hook,
                architecture=arch,
                label=_label(members[0]["dictionary"]),
                dictionaries=tuple(r["dictionary"] for r in members),
                seeds=seeds,
                spec=json.loads(spec_json),
                stats=stats,
            )
        )
    rows.sort(
        key=lambda r: (
            exp_order[r.experiment],
            _arch_rank(r.architecture),
            r.hook,
            len(r.models),
            cmp_order[r.models],
            r.label,
        )
    )
    return rows


# ----------------------------------------------------------------------------------------------
# CSV


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
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
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
    return path


# ----------------------------------------------------------------------------------------------
# Markdown


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
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# LaTeX

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
        rows, key=lambda r: (_arch_rank(r.architecture), exp_order[r.experiment], r.hook)
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
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# all together


def write_report(eval_dirs: list[Path], out_dir: Path) -> dict[str, Path]:
    """Collect, aggregate and write ``report.csv``, ``report.md``, ``report.tex`` into ``out_dir``.

    Returns {"csv": ..., "md": ..., "tex": ...}.
    """
    return _write_all(aggregate(collect(eval_dirs)), out_dir)


def _write_all(rows: Sequence[Row], out_dir: Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "csv": write_csv(rows, out / "report.csv"),
        "md": write_markdown(rows, out / "report.md"),
        "tex": write_latex(rows, out / "report.tex"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.report", description=__doc__.splitlines()[0])
    p.add_argument("eval_dirs", nargs="+", type=Path, help="eval directories (<dir>/<dictionary>/splice.json)")
    p.add_argument("--out", type=Path, required=True, help="where to write report.csv/.md/.tex")
    args = p.parse_args(argv)
    rows = aggregate(collect(args.eval_dirs))
    paths = _write_all(rows, args.out)
    print(format_table(rows))
    for p_ in paths.values():
        print(p_)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
