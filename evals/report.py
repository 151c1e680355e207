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
from collections.abc import Sequence
from pathlib import Path

from .report_rows import Row, aggregate, collect
from .report_tables import format_table, write_csv, write_latex, write_markdown

__all__ = ["main", "write_report"]


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
