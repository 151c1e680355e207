"""The codebase's shape, checked: modules of one job stay small, and the one-way import contract
(pipeline <- trainer <- evals <- mdiff) really refuses an import against the flow."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "trainer", "evals", "mdiff")
MAX_LINES = 450


def test_no_module_is_over_the_size_limit():
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    assert len(sizes) > 40
    assert {f: n for f, n in sizes.items() if n > MAX_LINES} == {}


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter is not installed in this environment (make test installs it)")
    env = {"PATH": str(exe.parent), "PYTHONPATH": str(root), "HOME": str(root)}
    return subprocess.run([str(exe), str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """The packages and pyproject.toml, copied so that a forbidden import can be added to them."""
    root = tmp_path_factory.mktemp("layout")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_import_contract_holds(tree_copy):
    run = _lint_imports(tree_copy)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 kept, 0 broken" in run.stdout


@pytest.mark.parametrize("importer, imported", [("pipeline/cache.py", "trainer.train"),
                                                ("trainer/train.py", "evals.run"),
                                                ("evals/run.py", "mdiff.cli"),
                                                ("pipeline/experiment.py", "mdiff.config")])
def test_an_import_against_the_flow_breaks_the_contract(tree_copy, importer, imported):
    path = tree_copy / importer
    original = path.read_text(encoding="utf-8")
    try:
        path.write_text(original + f"\nimport {imported}  # against the flow\n", encoding="utf-8")
        run = _lint_imports(tree_copy)
    finally:
        path.write_text(original, encoding="utf-8")
    assert run.returncode != 0
    assert "BROKEN" in run.stdout and imported in run.stdout, run.stdout
