"""The query path of a rollout (models/paths.py): chosen at `/upgrade` from the compat pack's predicted
curves, changed by the operator (`PATCH /rollouts/{id}`), or by the guard when the live probe falls below
old/old (pause and fall back to old-only).

A path change is a change of `rollouts.mode`: every API process's follower sees a new layout on its next
cycle and swaps in a freshly built index set, so a process serves one path at a time, never a mix.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.paths import PATHS, SAFE_PATH, Choice, PathRefused, choose, scheduled_path
from service import events
from service.config import Settings
from service.db import queries
from service.db.models import ACTIVE_ROLLOUT_STATES, Rollout, utcnow
from service.errors import Conflict, InvalidRequest

log = logging.getLogger(__name__)

PREFERENCES = ("auto", *PATHS)


def predictions(session: Session, src: str, dst: str) -> dict[str, Any] | None:
    pack = queries.compat_pack(session, src, dst)
    return None if pack is None else (pack.manifest or {}).get("predictions")


def choose_path(
    session: Session, settings: Settings, src: str, dst: str, preference: str, policy: str, force: bool
) -> Choice:
    """The path and order for a rollout src -> dst; 422 for an unknown preference, 409 (with the predicted
    dip in the problem) for an explicit path predicted to fall below old/old, unless `force`."""
    if preference not in PREFERENCES:
        raise InvalidRequest("mode", f"must be one of {', '.join(PREFERENCES)}")
    try:
        return choose(predictions(session, src, dst), preference, policy, settings.path_margin, force)
    except PathRefused as e:
        raise Conflict("mode", str(e)) from e


def while_training(preference: str, policy: str) -> Choice:
    """The rollout's path until its pack is trained: old-only, so search answers exactly as before."""
    if preference not in PREFERENCES:
        raise InvalidRequest("mode", f"must be one of {', '.join(PREFERENCES)}")
    why = "training a compat pack on the gallery; the old model serves exactly as before until it is chosen"
    return Choice(SAFE_PATH, policy, f"{SAFE_PATH}: {why}", None, False)


def still_training(rollout: Rollout) -> bool:
    """A rollout whose compat pack is still to be trained (it was created without one)."""
    return rollout.training is not None and not rollout.training.get("done")


def apply_choice(rollout: Rollout, choice: Choice, requested: str) -> None:
    rollout.mode = choice.mode
    rollout.policy = choice.policy
    rollout.requested_mode = requested
    rollout.path_reason = choice.reason
    rollout.predicted = choice.predicted


def _publish(r: redis.Redis | None, rollout: Rollout, **fields: Any) -> None:
    if r is not None:
        events.publish(r, events.ROLLOUT, rollout_id=rollout.id, status=rollout.status, mode=rollout.mode, **fields)


def change_path(
    session: Session, settings: Settings, rollout: Rollout, preference: str, force: bool, r: redis.Redis | None
) -> Rollout:
    """The operator moves an active rollout (locked by the caller) to another path; the order stays."""
    if rollout.status not in ACTIVE_ROLLOUT_STATES:
        raise Conflict("status", f"rollout {rollout.id} is {rollout.status}; the path applies to active ones")
    choice = choose_path(session, settings, rollout.from_version, rollout.to_version, preference, rollout.policy, force)
    apply_choice(rollout, replace(choice, policy=rollout.policy), preference)
    return rollout


def trip_guard(
    session: Session, rollout_id: int, live: float, baseline: float, margin: float, r: redis.Redis | None
) -> Rollout | None:
    """The live probe fell below old/old by more than `margin`: pause the rollout and serve old-only. Does
    nothing (None) unless the rollout is still running on another path; one transaction, row locked."""
    rollout = queries.lock_rollout(session, rollout_id)
    if rollout is None or rollout.status != "running" or rollout.mode == SAFE_PATH:
        session.rollback()
        return None
    reason = (
        f"guard: live probe mAP {live:.4f} on path {rollout.mode} is below old/old {baseline:.4f} "
        f"by more than {margin}; paused and fell back to {SAFE_PATH}"
    )
    rollout.guard = {
        "at": utcnow().isoformat(),
        "path": rollout.mode,
        "live_map": round(live, 5),
        "baseline_map": round(baseline, 5),
        "margin": margin,
    }
    rollout.mode = SAFE_PATH
    rollout.status = "paused"
    rollout.path_reason = reason
    session.commit()
    log.warning("rollout %s: %s", rollout_id, reason)
    _publish(r, rollout, guard=reason)
    return rollout


def follow_schedule(session: Session, rollout: Rollout, fraction: float, r: redis.Redis | None) -> str | None:
    """Move a running (or operator-paused) `auto` rollout to the path its predicted schedule wants at
    `fraction` (done/total). A conditional update: any number of processes may call it; one wins. Returns
    the new path or None. A rollout the guard or the operator moved is left alone."""
    if rollout.status not in ("running", "paused") or rollout.requested_mode != "auto" or rollout.guard is not None:
        return None
    want = scheduled_path(rollout.predicted, fraction)
    if want is None or want == rollout.mode:
        return None
    reason = f"{rollout.path_reason}; switched to {want} at fraction {fraction:.3f} as scheduled"
    res = session.execute(
        sa.update(Rollout)
        .where(Rollout.id == rollout.id, Rollout.mode == rollout.mode, Rollout.status.in_(("running", "paused")))
        .values(mode=want, path_reason=reason)
    )
    session.commit()
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return None
    log.info("rollout %s: path %s -> %s at fraction %.3f (schedule)", rollout.id, rollout.mode, want, fraction)
    session.refresh(rollout)
    _publish(r, rollout)
    return want
