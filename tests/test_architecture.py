"""The import contract of docs/architecture.md (pyproject.toml ``[tool.importlinter]``), run
with import-linter: the layers hold and no package's modules import each other in a loop.
A second test plants an upward import in a copy of the sources and requires the check to
name it, so the contract cannot pass by checking nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: import-linter must analyse the sources under ``root``, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    for name in ("mtl_tune", "toy"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    planted = tmp_path / "mtl_tune" / "analysis" / "pareto.py"
    planted.write_text(planted.read_text() + "\nfrom mtl_tune.search import runner  # noqa: E402,F401\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0
    assert "mtl_tune.analysis.pareto -> mtl_tune.search.runner" in proc.stdout, proc.stdout[-3000:]
