"""Rollout paths (two-pass, old-only), the path's reason and prediction, the probe, the guard, and the
training phase (status `training`, its progress), rollback (status `rolled_back`)

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MODES_OLD = "mode IN ('reverse', 'forward')"
MODES_NEW = "mode IN ('reverse', 'forward', 'two-pass', 'old-only')"
COLUMNS = ("requested_mode", "path_reason", "predicted", "probe", "guard", "training")
STATUS_OLD = "status IN ('planning', 'running', 'paused', 'completed', 'aborted', 'failed')"
STATUS_NEW = (
    "status IN ('training', 'planning', 'running', 'paused', 'completed', 'aborted', 'failed', 'rolled_back')"
)


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("requested_mode", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("path_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("predicted", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("probe", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("guard", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("training", sa.JSON(), nullable=True))
        batch.drop_constraint(op.f("ck_rollouts_mode"), type_="check")
        batch.create_check_constraint("mode", MODES_NEW)
        batch.drop_constraint(op.f("ck_rollouts_status"), type_="check")
        batch.create_check_constraint("status", STATUS_NEW)


def downgrade() -> None:
    op.execute("UPDATE rollouts SET mode = 'reverse' WHERE mode NOT IN ('reverse', 'forward')")
    op.execute("UPDATE rollouts SET status = 'aborted', active_lock = NULL WHERE status = 'training'")
    op.execute("UPDATE rollouts SET status = 'completed' WHERE status = 'rolled_back'")
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_constraint(op.f("ck_rollouts_mode"), type_="check")
        batch.create_check_constraint("mode", MODES_OLD)
        batch.drop_constraint(op.f("ck_rollouts_status"), type_="check")
        batch.create_check_constraint("status", STATUS_OLD)
        for name in COLUMNS:
            batch.drop_column(name)
