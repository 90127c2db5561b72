"""`POST /upgrade?dry_run=true`: what an upgrade would do now, from the same checks as the real one
(`rollouts.plan_upgrade`), writing nothing: how many items, whether a compat pack exists or a training phase
comes first, the path and order `auto` would take with its predicted curve, and an ETA at the rate the last
finished rollout measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import rollouts
from service.config import Settings
from service.db.models import BackfillTask, Item, Rollout


@dataclass(frozen=True)
class Preview:
    from_version: str
    to_version: str
    items: int
    compat_pack: str
    train_sample: int | None
    status: str
    mode: str
    policy: str
    reason: str | None
    predicted: dict[str, Any] | None
    measured_items_per_second: float | None
    eta_seconds: float | None


def measured_rate(session: Session) -> float | None:
    """Items per second of the newest rollout that finished with work done: done tasks over its running time."""
    finished = session.scalars(
        sa.select(Rollout)
        .where(Rollout.status.in_(("completed", "failed")), Rollout.started_at.is_not(None))
        .order_by(Rollout.id.desc())
        .limit(5)
    ).all()
    for r in finished:
        if r.finished_at is None or r.started_at is None:
            continue
        seconds = (r.finished_at - r.started_at).total_seconds()
        done = session.scalar(
            sa.select(sa.func.count()).where(BackfillTask.rollout_id == r.id, BackfillTask.state == "done")
        )
        if seconds > 0 and done:
            return float(done) / seconds
    return None


def preview_upgrade(
    session: Session,
    settings: Settings,
    *,
    to: str,
    mode: str = "auto",
    policy: str = "uncertainty",
    batch_size: int | None = None,
    max_items_per_second: float | None = None,
    force: bool = False,
) -> Preview:
    """The dry run: refuses exactly what `create_rollout` refuses, with the same errors."""
    plan = rollouts.plan_upgrade(session, settings, to, mode, policy, batch_size, max_items_per_second, force)
    session.rollback()  # nothing was written; end the read transaction
    items = int(session.scalar(sa.select(sa.func.count()).select_from(Item).where(Item.deleted_at.is_(None))) or 0)
    rate = measured_rate(session)
    if rate is not None and plan.throttle is not None:
        rate = min(rate, plan.throttle)
    training = plan.status == "training"
    return Preview(
        from_version=plan.current,
        to_version=to,
        items=items,
        compat_pack="trained on the gallery" if training else "found",
        train_sample=min(settings.train_sample, items) if training else None,
        status=plan.status,
        mode=plan.choice.mode,
        policy=plan.choice.policy,
        reason=plan.choice.reason,
        predicted=plan.choice.predicted,
        measured_items_per_second=None if rate is None else round(rate, 3),
        eta_seconds=None if not rate else round(items / rate, 1),
    )
