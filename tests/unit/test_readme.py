"""The README stays true: its configuration table is the one generated from Settings."""

from __future__ import annotations

import importlib.util

from service.config import REPO_ROOT


def test_settings_table_is_current() -> None:
    spec = importlib.util.spec_from_file_location("settings_table", REPO_ROOT / "scripts" / "settings_table.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (REPO_ROOT / "README.md").read_text()
    assert mod.readme_with_table(readme) == readme, "run: python scripts/settings_table.py --write"
