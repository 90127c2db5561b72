"""`backfill`: the single entry point for operators and developers.

The command modules are listed here, once; each one adds its commands with `register(app)`.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperOption

from cli import db, dev, evaluate, items, rollout, serve, train
from service.config import SettingsError

COMMANDS = (db, serve, train, evaluate, rollout, items, dev)

_display_type_rich = TyperOption.display_type_rich


def _flag_shows_no_type(self: TyperOption, ctx: Any) -> str | None:
    # typer's rich help prints a "<bool>" type column for on/off flags, which take no value.
    return None if self.is_flag else _display_type_rich(self, ctx)


TyperOption.display_type_rich = _flag_shows_no_type  # type: ignore[method-assign]


class BackfillApp(typer.Typer):
    """A bad setting ends any command with its one-line message (exit 2), not a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except SettingsError as e:
            print(f"configuration error: {e}", file=sys.stderr)
            sys.exit(2)


app = BackfillApp(help="Online embedding-model upgrades for a live retrieval service.", no_args_is_help=True)
for command in COMMANDS:
    command.register(app)

if __name__ == "__main__":
    app()
