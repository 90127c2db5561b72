"""Rollback after completion: the previous model serves again from its retained vectors, without re-encoding.

Allowed for the newest completed rollout while its old model is still retained: every live item must still
have that model's vector (the retention sweep deletes them `BACKFILL_OLD_EMBEDDING_RETENTION_DAYS` after
completion, and items added after completion were embedded with the new model only). Otherwise 409, naming
what is missing. The rolled-back model goes back to `registered` with its vectors kept, so upgrading to it
again finds every item done.
"""

from __future__ import annotations

import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import events
from service.db import queries
from service.db.models import Embedding, Item, ModelVersion, Rollout, utcnow
from service.errors import Conflict, NotFound


def missing_vectors(session: Session, model: str) -> int:
    """Live items without a vector of `model`."""
    has = sa.exists().where(Embedding.item_id == Item.id, Embedding.model_version == model)
    return int(session.scalar(sa.select(sa.func.count()).where(Item.deleted_at.is_(None), ~has)) or 0)


def rollback(session: Session, rollout_id: int, r: redis.Redis | None = None) -> Rollout:
    rollout = queries.lock_rollout(session, rollout_id)
    if rollout is None:
        session.rollback()
        raise NotFound("id", f"rollout {rollout_id} does not exist")
    try:
        _check(session, rollout)
    except Conflict:
        session.rollback()
        raise
    session.execute(sa.update(ModelVersion).where(ModelVersion.name == rollout.from_version).values(status="serving"))
    session.execute(sa.update(ModelVersion).where(ModelVersion.name == rollout.to_version).values(status="registered"))
    rollout.status = "rolled_back"
    rollout.error = f"rolled back at {utcnow().isoformat()}: {rollout.from_version} serves again"
    session.commit()
    if r is not None:
        events.publish(r, events.ROLLOUT, rollout_id=rollout.id, status=rollout.status)
    return rollout


def _check(session: Session, rollout: Rollout) -> None:
    if rollout.status != "completed":
        raise Conflict("status", f"rollout {rollout.id} is {rollout.status}; only a completed one can roll back")
    active = queries.active_rollout(session)
    if active is not None:
        raise Conflict("rollout", f"rollout {active.id} is {active.status}; abort it first")
    serving = queries.serving_model(session)
    if serving is None or serving.name != rollout.to_version:
        now = serving.name if serving is not None else "no model"
        raise Conflict("id", f"{now} serves now, not {rollout.to_version}: only the newest upgrade can roll back")
    missing = missing_vectors(session, rollout.from_version)
    if missing:
        raise Conflict(
            "id",
            f"{missing} live items have no {rollout.from_version} vector (swept after retention, or added after "
            "the upgrade completed); rolling back would leave them unsearchable",
        )
