"""The layer rules of pyproject.toml's import-linter contracts: they hold for the code, and they catch an
upward import (a planted one, in a copy of the tree)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("universality", "models", "sae")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the tree at ``root`` (its packages first on the path), without a cache."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports('pyproject.toml', no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})


def test_every_layer_contract_holds():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    errors = tmp_path / "universality" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _upward():\n    from universality import pipeline  # noqa: F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "universality.core.errors -> universality.pipeline" in result.stdout
