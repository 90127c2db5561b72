"""Run Alembic migrations programmatically (`backfill db upgrade`, embedded start-up, tests)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from service.config import REPO_ROOT, Settings


def alembic_config(settings: Settings) -> Config:
    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.attributes["url"] = settings.sqlalchemy_url
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade_head(settings: Settings) -> None:
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), "head")


def downgrade_base(settings: Settings) -> None:
    command.downgrade(alembic_config(settings), "base")
