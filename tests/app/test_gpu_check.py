"""The GPU check runs every stage in its CPU mode (small shapes) and reports each with a positive
rate; its setup script parses and finds the torch pin the project declares."""

import json
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from benchmarks.gpu_check import render

REPO = Path(__file__).resolve().parents[2]


def test_cpu_mode_reports_every_stage(tmp_path):
    out = tmp_path / "check.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--small", "--work", str(tmp_path / "w"),
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "small"
    rows = result["rows"]
    assert {r["stage"] for r in rows} == {"forward", "cache", "train", "loader", "sweep", "eval"}
    assert len([r for r in rows if r["stage"] == "cache"]) == 3  # two crosscoder models, one SAE model
    for r in rows:
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, r
        assert r["ratio"] is None or (math.isfinite(r["ratio"]) and r["ratio"] > 0), r
    checked = {r["stage"] for r in rows if r["passed"] is not None}
    assert checked == {"cache", "loader", "sweep"}
    table = run.stdout[run.stdout.index("| stage |"):]
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == len(rows) + 1
    assert (tmp_path / "w" / "runs" / "crosscoder" / "eval").is_dir()  # eval really ran


def test_table_marks_each_check():
    rows = [{"stage": "loader", "what": "x", "tokens_per_s": 10.0, "ratio": 3.0, "check": ">= 2x", "passed": True},
            {"stage": "sweep", "what": "y", "tokens_per_s": 5.0, "ratio": 2.0, "check": "<= 1.5x", "passed": False},
            {"stage": "eval", "what": "z", "tokens_per_s": 1.0, "ratio": None, "check": "information", "passed": None}]
    lines = [line for line in render(rows, "gpu", "GPU").splitlines() if line.startswith("| ") and "---" not in line]
    assert [line.rsplit("|", 2)[-2].strip() for line in lines[1:]] == ["PASS", "FAIL", ""]


def test_setup_script_parses_and_reads_the_torch_pin():
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    sed = re.search(r"TORCH_VERSION=\$\(sed -n '([^']+)' pyproject.toml\)", script.read_text()).group(1)
    got = subprocess.run(["sed", "-n", sed, "pyproject.toml"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [f"torch=={got}"] == [d for d in deps if d.startswith("torch")]
