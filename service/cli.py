"""`backfill`: the single entry point for operators and developers.

Each part of the system owns its commands in its own module; this file only assembles them.
"""

from __future__ import annotations

import typer

from service.config import get_settings

app = typer.Typer(help="Online embedding-model upgrades for a live retrieval service.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema (Alembic).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the configured database to the newest schema."""
    from service.db.migrate import upgrade_head

    upgrade_head(get_settings())
    typer.echo("database at head")


def _register() -> None:
    # Sub-command groups owned by other modules (models: train/eval; service: serve/models;
    # worker: worker/upgrade/status/rollout; demo; bench). A missing module is skipped so the CLI
    # always starts.
    import importlib

    for module_name in ("models.cli", "service.cli_service", "worker.cli", "service.demo", "service.bench"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        module.register(app)


_register()

if __name__ == "__main__":
    app()
