"""The README's configuration table, generated from service.config.Settings.

`python scripts/settings_table.py --write` rewrites it in README.md; tests/unit/test_readme.py keeps the two
equal, so the table cannot go stale.
"""

from __future__ import annotations

import sys

from service.config import REPO_ROOT, Settings

BEGIN, END = "<!-- SETTINGS-TABLE:BEGIN -->", "<!-- SETTINGS-TABLE:END -->"


def table() -> str:
    rows = ["| Variable | Default | What it does |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if hasattr(default, "get_secret_value"):
            default = "dev-operator-token (development only)"
        elif default is None:
            default = "unset"
        else:
            default = str(default).replace(str(REPO_ROOT) + "/", "./")
        rows.append(f"| `BACKFILL_{name.upper()}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)


def readme_with_table(readme: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        path = REPO_ROOT / "README.md"
        path.write_text(readme_with_table(path.read_text()))
    else:
        print(table())
