"""How long `mdiff demo` takes: a first run from scratch and a second run that reuses every cache.

Runs the demo twice in a fresh directory (or reuses one with --dir), each in its own process, and
writes the `demo` section of BENCHMARKS.md from the stage timings the demo records in
`demo-result.json` (wall seconds, this process's CPU seconds, and the load average at the start and
the end: on a shared machine the load says how far the wall times are from an idle machine's).
The pip and apt downloads happen in the first run too, so their time is part of it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common.helpers import RESULTS, ROOT, write_section


def run_once(directory: Path) -> dict:
    """One `mdiff demo` in a child process; its recorded timings plus the child's wall time."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mdiff.cli", "demo", str(directory), "--no-progress"],
                   check=True, cwd=ROOT)
    result = json.loads((directory / "demo-result.json").read_text())
    result["process_wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def stage_rows(timings: dict) -> list[tuple[str, float, float]]:
    return [(k, v, timings.get(f"cpu {k}", float("nan"))) for k, v in timings.items()
            if not k.startswith(("cpu ", "load "))]


def section(runs: list[tuple[str, dict]], notes: str = "") -> str:
    import torch

    lines = ["## The demo: real models on a CPU, first run and second run", "",
             f"Machine: CPU, {os.cpu_count()} cores; {platform.platform()}; torch {torch.__version__}. "
             "`mdiff demo` (SmolLM2-135M-Instruct vs a narrow, anchored 100-step Bible fine-tune of it; see the README). "
             "Wall seconds / CPU seconds of the demo's process per stage; the load average (1 min) "
             "says how much other work shared the 2 cores: above 2, wall times are longer than on an "
             "idle machine.", ""]
    if notes:
        lines += [notes, ""]
    for title, result in runs:
        t = result["timings"]
        lines += [f"**{title}** (load average {t.get('load average at the start')} at the start, "
                  f"{t.get('load average at the end')} at the end)", "",
                  "| stage | wall s | CPU s |", "|---|---:|---:|"]
        lines += [f"| {k} | {w:,.1f} | {c:,.1f} |" for k, w, c in stage_rows(t)]
        lines.append("")
    lines.append("Reproduce: `python -m benchmarks.bench_demo` (runs the demo twice in a fresh directory).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", help="demo directory (default: a fresh temporary one, so the first run is from scratch)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mdiff-demo-") as tmp:
        directory = Path(args.dir or tmp).resolve()
        first = run_once(directory)
        second = run_once(directory)
    runs = [("First run" + ("" if not args.dir else f" (in {directory}: what it already held was reused)"), first),
            ("Second run (everything cached)", second)]
    write_section(Path(args.out), "demo", section(runs))
    (RESULTS / "demo.json").write_text(json.dumps({"first": first, "second": second}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
