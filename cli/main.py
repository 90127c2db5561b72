"""`backfill`: the single entry point for operators and developers.

The command modules are listed here, once; each one adds its commands with `register(app)`.
"""

from __future__ import annotations

import typer

from cli import db, dev, evaluate, rollout, serve, train

COMMANDS = (db, serve, train, evaluate, rollout, dev)

app = typer.Typer(help="Online embedding-model upgrades for a live retrieval service.", no_args_is_help=True)
for command in COMMANDS:
    command.register(app)

if __name__ == "__main__":
    app()
