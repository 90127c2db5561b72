"""`POST /rollouts/{id}/retry-failed`: give a rollout's failed items another round of attempts.

On an active rollout the failed tasks go back to `pending` and the drivers pick them up. A rollout that
ended `failed` (its old model kept serving, its done items' vectors kept) is made active again, `running`,
when it is still the newest rollout and none other is active: the caller enqueues its drivers after the
commit, and it completes (or fails again) like any rollout. The tasks keep their last error until they
succeed; `attempts` restarts at 0 so each gets `max_attempts` new tries.
"""

from __future__ import annotations

import redis
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import events
from service.db import queries
from service.db.models import ACTIVE_ROLLOUT_STATES, BackfillTask, Rollout, utcnow
from service.errors import Conflict, NotFound


def retry_failed(session: Session, rollout_id: int, r: redis.Redis | None = None) -> tuple[Rollout, int]:
    """Failed tasks back to pending (reactivating a `failed` rollout); returns the rollout and how many."""
    rollout = queries.lock_rollout(session, rollout_id)
    if rollout is None:
        session.rollback()
        raise NotFound("id", f"rollout {rollout_id} does not exist")
    if rollout.status not in (*ACTIVE_ROLLOUT_STATES, "failed"):
        session.rollback()
        raise Conflict("status", f"rollout {rollout_id} is {rollout.status}; only an active or failed one can retry")
    t = BackfillTask
    failed = int(session.scalar(sa.select(sa.func.count()).where(t.rollout_id == rollout_id, t.state == "failed")) or 0)
    if not failed:
        session.rollback()
        raise Conflict("status", f"rollout {rollout_id} has no failed items")
    if rollout.status == "failed":
        _reactivate(session, rollout)
    session.execute(
        sa.update(t)
        .where(t.rollout_id == rollout_id, t.state == "failed")
        .values(state="pending", attempts=0, lease_expires_at=None, leased_by=None, updated_at=utcnow())
    )
    try:
        session.commit()
    except IntegrityError as e:  # another rollout became active meanwhile (uq_rollouts_active_lock)
        session.rollback()
        raise Conflict("rollout", "another rollout is already active") from e
    if r is not None:
        events.publish(r, events.ROLLOUT, rollout_id=rollout.id, status=rollout.status)
    return rollout, failed


def _reactivate(session: Session, rollout: Rollout) -> None:
    newest = session.scalar(sa.select(sa.func.max(Rollout.id)))
    if newest != rollout.id:
        session.rollback()
        raise Conflict("id", f"rollout {newest} came after rollout {rollout.id}; start a new upgrade instead")
    active = queries.active_rollout(session)
    if active is not None:
        session.rollback()
        raise Conflict("rollout", f"rollout {active.id} is {active.status}; wait for it or abort it")
    serving = queries.serving_model(session)
    if serving is None or serving.name != rollout.from_version:
        session.rollback()
        raise Conflict("id", f"{rollout.from_version} no longer serves; start a new upgrade instead")
    rollout.status = "running"
    rollout.active_lock = 1
    rollout.finished_at = None
    rollout.error = None
