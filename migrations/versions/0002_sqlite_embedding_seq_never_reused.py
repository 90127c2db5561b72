"""SQLite: embeddings.seq never reused (AUTOINCREMENT)

Without AUTOINCREMENT SQLite hands out max(rowid) + 1, so deleting the newest embedding (a retention sweep,
a purge) made the next insert reuse a seq that every follower had already passed: that row was never
ingested. Postgres sequences never reuse a value, so there it is a no-op.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _recreate(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("embeddings", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
        pass


def upgrade() -> None:
    _recreate(True)


def downgrade() -> None:
    _recreate(False)
