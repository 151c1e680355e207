"""Stage three's report: aggregate every dictionary's ``splice.json`` over seeds into tables.

Collects ``<eval_dir>/<dictionary name>/splice.json`` (written by ``mdiff eval``), aggregates runs
that differ only in their seed into rows (evals/report_rows.py) and writes them as ``report.csv``,
``report.md`` and ``report.tex`` (evals/report_tables.py). Plain Python and numpy only; also a
command line, ``python -m evals.report EVAL_DIR... --out DIR``.

    from evals.report import write_report
    from evals.report_rows import aggregate, collect
    from evals.report_tables import format_table
    paths = write_report([Path("runs/x/evals")], Path("runs/x/report"))
    print(format_table(aggregate(collect([Path("runs/x/evals")]))))
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.records import atomic_write_text

from .report_rows import Row, aggregate, collect
from .report_tables import format_table, write_csv, write_latex, write_markdown

__all__ = ["main", "write_report"]


def write_report(eval_dirs: list[Path], out_dir: Path) -> dict[str, Path]:
    """Collect, aggregate and write ``report.csv``, ``report.md``, ``report.tex`` into ``out_dir``.

    Returns {"csv": ..., "md": ..., "tex": ...}.
    """
    return _write_all(aggregate(collect(eval_dirs)), out_dir, eval_dirs)


# what each dictionary's evaluation folder may hold for a reader, in the order they are listed
_PAGES = (("browser/index.html", "latent browser"), ("latents.html", "most specific latents"),
          ("relative_norms.png", "relative decoder norms"), ("latent_scaling.png", "Latent Scaling"),
          ("activation_scatter.png", "firing on each model"))


def links_markdown(eval_dirs: Sequence[Path], out_dir: Path) -> str:
    """A "Where to look" section: each dictionary's pages and each experiment's lens, linked
    relative to the report so the folder can be moved or archived whole."""
    lines = []
    for ev in map(Path, eval_dirs):
        lens = ev / "diff_lens" / "diff_lens.md"
        if lens.exists():
            lines.append(f"- {ev.name}: [activation-difference lens]({os.path.relpath(lens, out_dir)})")
        for sub in sorted(p for p in ev.iterdir() if (p / "splice.json").exists()):
            found = [f"[{what}]({os.path.relpath(sub / f, out_dir)})" for f, what in _PAGES if (sub / f).exists()]
            if found:
                lines.append(f"- {sub.name}: " + ", ".join(found))
    return "\n## Where to look\n\n" + "\n".join(lines) + "\n" if lines else ""


def _write_all(rows: Sequence[Row], out_dir: Path, eval_dirs: Sequence[Path] = ()) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = write_markdown(rows, out / "report.md")
    links = links_markdown(eval_dirs, out)
    if links:
        atomic_write_text(md, md.read_text() + links)
    return {"csv": write_csv(rows, out / "report.csv"), "md": md, "tex": write_latex(rows, out / "report.tex")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.report", description=__doc__.splitlines()[0])
    p.add_argument("eval_dirs", nargs="+", type=Path, help="eval directories (<dir>/<dictionary>/splice.json)")
    p.add_argument("--out", type=Path, required=True, help="where to write report.csv/.md/.tex")
    args = p.parse_args(argv)
    rows = aggregate(collect(args.eval_dirs))
    paths = _write_all(rows, args.out, args.eval_dirs)
    print(format_table(rows))
    for p_ in paths.values():
        print(p_)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
