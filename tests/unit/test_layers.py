"""The one-way import contracts of pyproject.toml ([tool.importlinter]) hold, and really catch a backwards
import: the same contracts run on a copy of the tree with one deliberately wrong import must fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("tests", "cli", "devtools", "worker", "service", "models")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def copy_tree(dst: Path) -> None:
    shutil.copy(REPO / "pyproject.toml", dst / "pyproject.toml")
    for package in PACKAGES:
        shutil.copytree(REPO / package, dst / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@pytest.fixture(scope="module")
def linter() -> Path:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} missing: install the dev extra (`make venv`)", pytrace=False)
    return LINT_IMPORTS


def test_the_tree_keeps_its_import_contracts(linter: Path) -> None:
    r = lint_imports(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import", "broken"),
    [
        ("models/data.py", "import service.config", "models is not allowed to import service"),
        ("service/merge.py", "import worker.main", "service is not allowed to import worker"),
        ("worker/main.py", "import service.api.app", "worker is not allowed to import service.api"),
        ("service/config.py", "import tests.conftest", "service is not allowed to import tests"),
        ("service/merge.py", "import fastapi", "service is not allowed to import fastapi"),
    ],
)
def test_a_backwards_import_breaks_the_contracts(
    linter: Path, tmp_path: Path, module: str, wrong_import: str, broken: str
) -> None:
    copy_tree(tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{wrong_import}  # deliberately backwards\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0, r.stdout
    assert broken in r.stdout, r.stdout
