"""The README stays true: its configuration table is the one generated from Settings, and its layout
section names every top-level folder of the tree, and only those."""

from __future__ import annotations

import importlib.util
import re
import subprocess

from service.config import REPO_ROOT


def test_settings_table_is_current() -> None:
    spec = importlib.util.spec_from_file_location("settings_table", REPO_ROOT / "scripts" / "settings_table.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (REPO_ROOT / "README.md").read_text()
    assert mod.readme_with_table(readme) == readme, "run: python scripts/settings_table.py --write"


def test_layout_section_matches_the_tree() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed = set(re.findall(r"^(\w[\w-]*)/", block, flags=re.MULTILINE))
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    folders = {path.split("/", 1)[0] for path in tracked if "/" in path and not path.startswith(".")}
    assert listed == folders, (
        f"README lists {sorted(listed - folders)} not in the tree; misses {sorted(folders - listed)}"
    )
