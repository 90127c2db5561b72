"""`backfill db upgrade`."""

from __future__ import annotations

import typer

from service.config import get_settings

db_app = typer.Typer(help="Database schema (Alembic).", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the configured database to the newest schema."""
    from service.db.migrate import upgrade_head

    upgrade_head(get_settings())
    typer.echo("database at head")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
