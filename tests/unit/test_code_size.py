"""Small modules and short functions outside tests: no module over 600 lines, no function over 80."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cli", "devtools", "worker", "service", "models", "scripts", "migrations")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 80


# A migration is a frozen record of one schema change, written once and never edited after it lands.
FROZEN = "migrations/versions/"


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def test_there_are_sources_to_measure() -> None:
    assert len(sources()) > 20


def test_no_module_over_600_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in sources() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_no_function_over_80_lines() -> None:
    long: dict[str, int] = {}
    for path in sources():
        if str(path.relative_to(REPO)).startswith(FROZEN):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(REPO)}:{node.lineno} {node.name}"] = n
    assert not long, long
