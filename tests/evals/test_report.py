"""The report (evals/report.py, report_rows.py, report_tables.py): collecting splice.json files,
aggregating over seeds, CSV / Markdown / LaTeX."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from evals.report import write_report
from evals.report_rows import aggregate, collect
from evals.report_tables import format_table, latex_escape, write_csv, write_latex, write_markdown

EXP2 = "pythia-1b-1B-vs-4B"  # a 2-model comparison
EXP3 = "pythia_1b_3way"  # a 3-model comparison (underscores: LaTeX escaping)
MODELS = {EXP2: ["1B", "4B"], EXP3: ["1B", "4B", "286B"]}

def _v(**kw) -> dict:
    return kw


# Hand-chosen per-seed values: (experiment, group) -> per-seed dicts.
# l0, dead, ev (global explained variance), ce (ce_diff per model), score, kl, mev (per-model EV)
VALUES = {
    (EXP2, "btk"): [
        _v(l0=31.9, dead=120, ev=0.79, ce=[0.09, 0.10], score=[0.97, 0.96], kl=[0.08, 0.09], mev=[0.80, 0.78]),
        _v(l0=32.1, dead=118, ev=0.80, ce=[0.10, 0.12], score=[0.98, 0.95], kl=[0.07, 0.10], mev=[0.81, 0.79]),
        _v(l0=32.3, dead=125, ev=0.78, ce=[0.11, 0.14], score=[0.96, 0.97], kl=[0.09, 0.11], mev=[0.79, 0.77]),
    ],
    (EXP2, "relu"): [
        _v(l0=88.3, dead=9, ev=0.85, ce=[0.00, 0.07], score=[0.99, 0.98], kl=[0.01, 0.05], mev=[0.86, 0.84]),
        _v(l0=88.0, dead=11, ev=0.86, ce=[0.01, 0.06], score=[0.99, 0.97], kl=[0.02, 0.04], mev=[0.87, 0.85]),
        _v(l0=88.6, dead=9, ev=0.84, ce=[-0.01, 0.08], score=[0.98, 0.99], kl=[0.03, 0.06], mev=[0.85, 0.83]),
    ],
    (EXP2, "btk64"): [  # the single-seed group
        _v(l0=63.5, dead=40, ev=0.88, ce=[0.05, 0.06], score=[0.99, 0.99], kl=[0.03, 0.03], mev=[0.89, 0.87]),
    ],
    (EXP3, "btk"): [
        _v(l0=214.1, dead=2, ev=0.70, ce=[0.05, 0.18, 0.30], score=[0.9, 0.8, 0.7], kl=[0.1, 0.2, 0.3], mev=[0.7, 0.71, 0.69]),
        _v(l0=214.3, dead=1, ev=0.71, ce=[0.06, 0.17, 0.32], score=[0.91, 0.81, 0.69], kl=[0.11, 0.2, 0.31], mev=[0.71, 0.7, 0.7]),
        _v(l0=214.0, dead=2, ev=0.69, ce=[0.04, 0.19, 0.31], score=[0.89, 0.79, 0.71], kl=[0.09, 0.21, 0.29], mev=[0.69, 0.72, 0.68]),
    ],
    (EXP3, "relu"): [
        _v(l0=190.4, dead=9, ev=0.75, ce=[0.02, 0.09, 0.20], score=[0.95, 0.9, 0.85], kl=[0.05, 0.1, 0.15], mev=[0.75, 0.76, 0.74]),
        _v(l0=190.1, dead=8, ev=0.74, ce=[0.03, 0.08, 0.22], score=[0.94, 0.91, 0.84], kl=[0.06, 0.1, 0.16], mev=[0.74, 0.75, 0.73]),
        _v(l0=190.8, dead=10, ev=0.76, ce=[0.01, 0.10, 0.21], score=[0.96, 0.92, 0.86], kl=[0.04, 0.11, 0.14], mev=[0.76, 0.77, 0.75]),
    ],
}
ARCH = {"btk": "batchtopk", "btk64": "batchtopk", "relu": "relu"}
K = {"btk": 32, "btk64": 64, "relu": None}


def _name(exp: str, group: str, seed: int) -> str:
    if group == "btk":
        return f"btk-k32-s{seed}"
    if group == "btk64":
        return f"btk-k64_seed{seed}"
    # relu: suffix style differs per experiment; in EXP3 the names carry no seed at all
    return f"relu-l1-seed{seed}" if exp == EXP2 else f"relu_l1_{'abc'[seed]}"


def _silent(v: dict) -> int:  # silent on the evaluated tokens: the dead ones and 100 rare ones
    return v["dead"] + 100


def _alive(v: dict) -> float:
    return 1 - _silent(v) / 16384


def _l1(v: dict) -> float:
    return 2.5 * v["l0"]


def _record(exp: str, group: str, seed: int, v: dict) -> dict:
    models = MODELS[exp]
    name = _name(exp, group, seed)
    per_model = {
        m: {
            "ce_loss_without_sae": 2.9,
            "ce_loss_with_sae": 2.9 + v["ce"][i],
            "ce_loss_with_ablation": 7.1,
            "ce_loss_with_mean_ablation": 5.0,
            "ce_diff": v["ce"][i],
            "ce_loss_score": v["score"][i],
            "kl_div_with_sae": v["kl"][i],
            "kl_div_with_ablation": 4.0,
            "kl_div_score": 0.98,
            "explained_variance": v["mev"][i],
            "mse": 300.0,
            "cossim": 0.9,
            "l2_norm_in": 45.2,
            "l2_norm_out": 43.0,
            "l2_ratio": 0.95,
        }
        for i, m in enumerate(models)
    }
    spec = {"name": name, "architecture": ARCH[group], "n_latents": 16384, "k": K[group], "lr": None, "seed": seed}
    return {
        "dictionary": name,
        "experiment": exp,
        "architecture": ARCH[group],
        "spec": spec,
        "seed": seed,
        "models": models,
        "hook": "layer8.resid_post",
        "n_sequences": 256,
        "n_tokens": 32512,
        "metrics": {
            "per_model": per_model,
            "explained_variance": v["ev"],
            "mse": 310.0,
            "l0": v["l0"],
            "l1": _l1(v),
            "frac_alive": _alive(v),
            "dead_latents": v["dead"],
            "dead_latents_definition": "silent for >= 10000000 training tokens when training ended",
            "silent_on_eval": _silent(v),
            "silent_on_eval_tokens": 32512,
            "n_latents": 16384,
        },
        "ce_diff": {m: v["ce"][i] for i, m in enumerate(models)},
    }


def _write(eval_dir: Path, rec: dict) -> None:
    d = eval_dir / rec["dictionary"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "splice.json").write_text(json.dumps(rec))


@pytest.fixture
def eval_dirs(tmp_path: Path) -> list[Path]:
    dirs = {EXP2: tmp_path / "exp2" / "evals", EXP3: tmp_path / "exp3" / "evals"}
    for (exp, group), seeds in VALUES.items():
        for seed, v in enumerate(seeds):
            _write(dirs[exp], _record(exp, group, seed, v))
    (dirs[EXP2] / "not-a-dictionary").mkdir()  # ignored: no splice.json
    return [dirs[EXP2], dirs[EXP3]]


def _expected(exp: str, group: str) -> dict[str, tuple[float, float]]:
    vals = VALUES[(exp, group)]

    def ms(xs):
        a = np.asarray(xs, dtype=np.float64)
        return float(np.mean(a)), (float(np.std(a, ddof=1)) if a.size > 1 else math.nan)

    out = {"l0": ms([v["l0"] for v in vals]), "dead_latents": ms([v["dead"] for v in vals]),
           "silent_on_eval": ms([_silent(v) for v in vals]), "l1": ms([_l1(v) for v in vals]),
           "frac_alive": ms([_alive(v) for v in vals]), "explained_variance": ms([v["ev"] for v in vals])}
    for i, x in enumerate("ABC"[: len(MODELS[exp])]):
        out[f"ce_diff_{x}"] = ms([v["ce"][i] for v in vals])
        out[f"ce_loss_score_{x}"] = ms([v["score"][i] for v in vals])
        out[f"kl_div_with_sae_{x}"] = ms([v["kl"][i] for v in vals])
        out[f"explained_variance_{x}"] = ms([v["mev"][i] for v in vals])
    return out


LABELS = {(EXP2, "btk"): "btk-k32", (EXP2, "relu"): "relu-l1", (EXP2, "btk64"): "btk-k64",
          (EXP3, "btk"): "btk-k32", (EXP3, "relu"): "relu_l1_a"}


def test_collect_and_grouping(eval_dirs):
    records = collect(eval_dirs)
    assert len(records) == sum(len(v) for v in VALUES.values()) == 13
    rows = aggregate(records)
    # grouping ignores seed and name (EXP3's relu runs are named relu_l1_a/b/c), not the spec (k=64)
    assert len(rows) == 5
    got = {(r.experiment, r.label): r for r in rows}
    assert set(got) == {(e, lab) for (e, _), lab in LABELS.items()}
    assert [(r.experiment, r.architecture, r.label) for r in rows] == [
        (EXP2, "relu", "relu-l1"), (EXP2, "batchtopk", "btk-k32"), (EXP2, "batchtopk", "btk-k64"),
        (EXP3, "relu", "relu_l1_a"), (EXP3, "batchtopk", "btk-k32"),
    ]
    r = got[(EXP2, "btk-k32")]
    assert r.n_seeds == 3 and r.seeds == (0, 1, 2) and r.dictionaries == ("btk-k32-s0", "btk-k32-s1", "btk-k32-s2")
    assert r.comparison == "1B vs. 4B" and r.model("A") == "1B" and r.model("C") is None
    assert "name" not in r.spec and "seed" not in r.spec and r.spec["k"] == 32
    assert got[(EXP3, "relu_l1_a")].dictionaries == ("relu_l1_a", "relu_l1_b", "relu_l1_c")
    assert got[(EXP3, "btk-k32")].comparison == "1B vs. 4B vs. 286B"


def test_lr_is_part_of_the_group_key():
    recs = [_record(EXP2, "btk", s, v) for s, v in enumerate(VALUES[(EXP2, "btk")])]
    recs[2]["spec"]["lr"] = 1e-4
    rows = aggregate(recs)
    assert sorted(r.n_seeds for r in rows) == [1, 2]


def test_csv_matches_numpy(eval_dirs, tmp_path):
    rows = aggregate(collect(eval_dirs))
    path = write_csv(rows, tmp_path / "out" / "report.csv")
    with path.open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 5
    by = {(ln["experiment"], ln["dictionary"]): ln for ln in lines}
    for key, label in LABELS.items():
        ln = by[(key[0], label)]
        assert int(ln["n_seeds"]) == len(VALUES[key])
        for metric, (mean, std) in _expected(*key).items():
            assert float(ln[f"{metric}_mean"]) == mean, (key, metric)
            if math.isnan(std):
                assert ln[f"{metric}_std"] == "nan"
            else:
                assert float(ln[f"{metric}_std"]) == std, (key, metric)
    # model names by position; the C columns of 2-model comparisons are empty
    two, three = by[(EXP2, "btk-k32")], by[(EXP3, "btk-k32")]
    assert (two["model_A"], two["model_B"], two["model_C"]) == ("1B", "4B", "")
    assert two["ce_diff_C_mean"] == two["ce_diff_C_std"] == ""
    assert three["model_C"] == "286B" and float(three["ce_diff_C_mean"]) == pytest.approx(0.31)
    assert two["seeds"] == "0;1;2" and two["comparison"] == "1B vs. 4B"


def test_single_seed_group(eval_dirs):
    rows = aggregate(collect(eval_dirs))
    (r,) = [r for r in rows if r.label == "btk-k64"]
    assert r.n_seeds == 1 and r.mean("l0") == 63.5 and math.isnan(r.std("l0"))
    assert "| btk-k64 | 63.50 ± – | 40.0 ± – | 140.0 ± – | 0.050 ± – | 0.060 ± – | – | 1 |" in format_table(rows)


def test_markdown(eval_dirs, tmp_path):
    rows = aggregate(collect(eval_dirs))
    table = format_table(rows)
    lines = table.strip().splitlines()
    assert lines[0] == "| experiment | comparison | dictionary | L0 | dead | silent | ΔCE A | ΔCE B | ΔCE C | seeds |"
    assert len(lines) == 2 + 5
    # btk-k32 on 1B vs. 4B: l0 32.1 ± 0.2, dead 121 ± sqrt(13), silent 221 ± sqrt(13), ΔCE A 0.10 ± 0.01,
    # B 0.12 ± 0.02
    assert (f"| {EXP2} | 1B vs. 4B | btk-k32 | 32.10 ± 0.20 | 121.0 ± 3.6 | 221.0 ± 3.6 | 0.100 ± 0.010 "
            "| 0.120 ± 0.020 | – | 3 |") in lines
    assert any(ln.startswith(f"| {EXP3} | 1B vs. 4B vs. 286B | btk-k32 |") and "| 0.310 ± 0.010 | 3 |" in ln for ln in lines)
    assert {ln.count("|") for ln in lines} == {11}
    path = write_markdown(rows, tmp_path / "report.md")
    text = path.read_text()
    assert table in text
    assert "dead: latents silent for dead_after_tokens training tokens" in text  # the caption tells them apart
    assert "silent: latents that never fired on the evaluated tokens" in text


def _unescaped_amps(line: str) -> int:
    return len(re.findall(r"(?<!\\)&", line))


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)&", line.removesuffix(r"\\"))]


def test_latex(eval_dirs, tmp_path):
    rows = aggregate(collect(eval_dirs))
    tex = write_latex(rows, tmp_path / "report.tex").read_text()
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 1
    assert r"\begin{tabular}{llcccccc}" in tex and r"\multirow" not in tex
    lines = [ln.strip() for ln in tex.splitlines()]
    table = lines[lines.index(r"\toprule") + 1 : lines.index(r"\bottomrule")]
    data = [ln for ln in table if ln.endswith(r"\\")]
    assert {_unescaped_amps(ln) for ln in data} == {7}  # 8 columns in every row
    # header, 2 architecture title rows, 5 data rows; \midrule after the header and between the 2 types
    assert len(data) == 1 + 2 + 5 and table.count(r"\midrule") == 2
    assert data[1].startswith(r"\textit{ReLU") and data[4].startswith(r"\textit{BatchTopK}")
    relu = [_cells(ln) for ln in data[2:4]]
    btk = [_cells(ln) for ln in data[5:8]]
    # the model (experiment) on the first row of its block only, escaped
    assert relu[0][:2] == [EXP2, r"1B vs.\ 4B"] and relu[1][:2] == [r"pythia\_1b\_3way", r"1B vs.\ 4B vs.\ 286B"]
    # two batchtopk dictionaries on one comparison: the label tells them apart
    assert btk[0][:2] == [EXP2, r"1B vs.\ 4B (btk-k32)"] and btk[1][:2] == ["", r"1B vs.\ 4B (btk-k64)"]
    assert btk[2][:2] == [r"pythia\_1b\_3way", r"1B vs.\ 4B vs.\ 286B"]
    # mean $\pm$ std, 2 decimals, dead and silent as integers (121 +- sqrt(13)); "--" for C of 2 models
    assert btk[0][2:] == [r"32.10 $\pm$ 0.20", r"121 $\pm$ 4", r"221 $\pm$ 4", r"0.10 $\pm$ 0.01",
                          r"0.12 $\pm$ 0.02", "--"]
    assert btk[1][2:] == [r"63.50 $\pm$ --", r"40 $\pm$ --", r"140 $\pm$ --", r"0.05 $\pm$ --", r"0.06 $\pm$ --",
                          "--"]
    assert btk[2][2:] == [r"214.13 $\pm$ 0.15", r"2 $\pm$ 1", r"102 $\pm$ 1", r"0.05 $\pm$ 0.01",
                          r"0.18 $\pm$ 0.01", r"0.31 $\pm$ 0.01"]
    assert "pythia_1b" not in tex  # every underscore escaped


def test_latex_escape():
    assert latex_escape("a_b & c% #1") == r"a\_b \& c\% \#1"


def test_write_report(eval_dirs, tmp_path):
    paths = write_report(eval_dirs, tmp_path / "report")
    assert set(paths) == {"csv", "md", "tex"}
    assert [p.name for p in paths.values()] == ["report.csv", "report.md", "report.tex"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())


def test_collect_errors(tmp_path):
    empty = tmp_path / "evals"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"mdiff eval CONFIG") as e:
        collect([empty, tmp_path / "missing"])
    assert str(empty) in str(e.value) and "does not exist" in str(e.value)
    bad = empty / "dict-s0"
    bad.mkdir()
    (bad / "splice.json").write_text('{"dictionary": "dict-s0"}')
    with pytest.raises(ValueError, match="missing key"):
        collect([empty])


def test_unknown_and_legacy_dead_counts(tmp_path):
    """A dictionary without a training record has dead_latents null: "unknown", never guessed. A
    splice.json written before the two counts were separated holds only dead_latents, which then
    counted latents silent on the evaluated tokens: it is read as silent_on_eval."""
    v = VALUES[(EXP2, "btk64")][0]
    unknown = _record(EXP2, "btk64", 0, v)
    unknown["metrics"]["dead_latents"] = None
    legacy = _record(EXP2, "relu", 0, v)
    legacy["metrics"] = {k: x for k, x in legacy["metrics"].items()
                         if k not in ("silent_on_eval", "silent_on_eval_tokens", "dead_latents_definition")}
    rows = aggregate([unknown, legacy])
    by = {r.label: r for r in rows}
    assert math.isnan(by["btk-k64"].mean("dead_latents")) and by["btk-k64"].mean("silent_on_eval") == 140
    assert math.isnan(by["relu-l1"].mean("dead_latents")) and by["relu-l1"].mean("silent_on_eval") == 40
    table = format_table(rows)
    assert "| btk-k64 | 63.50 ± – | unknown | 140.0 ± – |" in table
    assert "| relu-l1 | 63.50 ± – | unknown | 40.0 ± – |" in table
    tex = write_latex(rows, tmp_path / "report.tex").read_text()
    assert r"63.50 $\pm$ -- & ? & 140 $\pm$ --" in tex


def test_conventions_of_the_analyses_are_named(tmp_path):
    """The units an SAE was run on other models in, and the relative-norm convention of the
    crosscoder classes, come from diff.json beside each splice.json into report.csv and the captions."""
    ev = tmp_path / "evals"
    v = VALUES[(EXP2, "btk64")][0]
    for group, diff in (("btk64", {"kind": "2-model crosscoder", "compared_with": [], "class_convention": "delta"}),
                        ("relu", {"kind": "SAE", "compared_with": ["4B"], "transfer_units": "source"})):
        rec = _record(EXP2, group, 0, v)
        _write(ev, rec)
        (ev / rec["dictionary"] / "diff.json").write_text(json.dumps(diff))
    rows = aggregate(collect([ev]))
    with write_csv(rows, tmp_path / "report.csv").open() as f:
        lines = {ln["dictionary"]: ln for ln in csv.DictReader(f)}
    assert (lines["btk-k64"]["class_convention"], lines["btk-k64"]["transfer_units"]) == ("delta", "")
    assert (lines["relu-l1"]["class_convention"], lines["relu-l1"]["transfer_units"]) == ("", "source")
    assert lines["relu-l1"]["silent_on_eval_tokens"] == "32512"
    md = write_markdown(rows, tmp_path / "report.md").read_text()
    assert "fed their activations in source units" in md and "relative decoder norm delta" in md
    tex = write_latex(rows, tmp_path / "report.tex").read_text()
    assert "in source units" in tex and "relative decoder norm delta" in tex


def test_report_links_the_pages_that_exist(eval_dirs, tmp_path):
    ev = eval_dirs[0]
    dictionary = next(p for p in sorted(ev.iterdir()) if (p / "splice.json").exists())
    (dictionary / "browser").mkdir()
    (dictionary / "browser" / "index.html").write_text("<html></html>")
    (dictionary / "latent_scaling.png").write_bytes(b"png")
    (ev / "diff_lens").mkdir()
    (ev / "diff_lens" / "diff_lens.md").write_text("# lens")
    md = write_report(eval_dirs, tmp_path / "report")["md"].read_text()
    section = md.split("## Where to look", 1)[1]
    assert "[activation-difference lens](../exp2/evals/diff_lens/diff_lens.md)" in section
    link = f"[latent browser](../exp2/evals/{dictionary.name}/browser/index.html)"
    assert f"- {dictionary.name}: {link}, [Latent Scaling](../exp2/evals/{dictionary.name}/latent_scaling.png)" in section
    assert "latents.html" not in section  # pages that do not exist are not linked
    assert (tmp_path / "report" / "../exp2/evals/diff_lens/diff_lens.md").resolve().exists()
