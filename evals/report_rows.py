"""The report's rows: every dictionary's ``splice.json`` collected and aggregated over seeds.

Input (written by ``mdiff eval``): one file per evaluated dictionary at
``<eval_dir>/<dictionary name>/splice.json``, and the conventions its model-diff analysis used
from ``diff.json`` beside it when there is one. Runs that differ only in their seed (and name) form
a group; each group becomes one Row with the mean and the sample standard deviation (ddof=1) over
its seeds. A group with a single seed has std nan. evals/report_tables.py formats the rows.

Two counts of inactive latents are kept apart: ``dead_latents`` (the training definition, silent
for ``dead_after_tokens`` training tokens; nan = unknown, for dictionaries that do not record it)
and ``silent_on_eval`` (never fired on the evaluated tokens). splice.json files written before the
two were separated hold only ``dead_latents``, which then meant the second: they are read as
``silent_on_eval`` with ``dead_latents`` unknown.
"""

from __future__ import annotations

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
    "CONVENTIONS",
    "GLOBAL_METRICS",
    "PER_MODEL_METRICS",
    "SPLICE_FILE",
    "Row",
    "aggregate",
    "arch_rank",
    "collect",
    "model_letter",
]

SPLICE_FILE = "splice.json"

# Aggregated metrics. Global ones come from record["metrics"][name]; per-model ones from
# record["metrics"]["per_model"][model][name] and are named f"{name}_{letter}" (A = 1st model, ...).
GLOBAL_METRICS = ("l0", "l1", "dead_latents", "silent_on_eval", "frac_alive", "explained_variance")
# how each row was measured, from splice.json and diff.json: key -> the values of its members
CONVENTIONS = ("silent_on_eval_tokens", "transfer_units", "class_convention")
DIFF_FILE = "diff.json"
PER_MODEL_METRICS = ("ce_diff", "ce_loss_score", "kl_div_with_sae", "explained_variance")

# Order of dictionary types in the tables.
_ARCH_ORDER = ("relu", "topk", "batchtopk", "jumprelu")

_SEED_SUFFIX = re.compile(r"[-_](?:s|seed)\d+$")
_REQUIRED_KEYS = ("dictionary", "experiment", "architecture", "models", "metrics")


def model_letter(i: int) -> str:
    """Column letter of the i-th model of a comparison: A, B, C, ... (then M27, M28, ...)."""
    return string.ascii_uppercase[i] if i < len(string.ascii_uppercase) else f"M{i + 1}"


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
            records[-1]["_conventions"] = _conventions(path.parent / DIFF_FILE)
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


def _conventions(diff_path: Path) -> dict[str, str]:
    """From the model-diff summary beside a splice.json: the units an SAE was run on other models
    in and the relative-norm convention of the crosscoder classes (absent where they do not apply)."""
    out = {}
    if diff_path.is_file():
        try:
            diff = json.loads(diff_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{diff_path}: cannot read the model-diff summary: {e}") from e
        if diff.get("compared_with") and diff.get("transfer_units"):
            out["transfer_units"] = str(diff["transfer_units"])
        if diff.get("class_convention"):
            out["class_convention"] = str(diff["class_convention"])
    return out


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
    conventions: dict[str, str] = field(default_factory=dict)  # CONVENTIONS key -> its values, ";"-joined

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
    # not records.canonical_json: default=str keeps in-memory records with non-JSON values groupable
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
        if "silent_on_eval" not in metrics and metric in ("dead_latents", "silent_on_eval"):
            # written before the two counts were separated: its dead_latents counted silent latents
            return math.nan if metric == "dead_latents" else _float(metrics.get("dead_latents"))
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


def arch_rank(arch: str) -> tuple[int, str]:
    """Sort key of a dictionary type: relu, topk, batchtopk, jumprelu, then any other by name."""
    return (_ARCH_ORDER.index(arch), "") if arch in _ARCH_ORDER else (len(_ARCH_ORDER), arch)


def _convention(rec: dict, key: str) -> str | None:
    if key == "silent_on_eval_tokens":
        tokens = rec["metrics"].get(key)
        return None if tokens is None else str(tokens)
    return rec.get("_conventions", {}).get(key)


def _joined_conventions(members: list[dict]) -> dict[str, str]:
    out = {}
    for key in CONVENTIONS:
        values = dict.fromkeys(_convention(m, key) for m in members)
        values.pop(None, None)
        if values:
            out[key] = ";".join(values)
    return out


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
                conventions=_joined_conventions(members),
            )
        )
    rows.sort(
        key=lambda r: (
            exp_order[r.experiment],
            arch_rank(r.architecture),
            r.hook,
            len(r.models),
            cmp_order[r.models],
            r.label,
        )
    )
    return rows
