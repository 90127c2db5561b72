"""The rollout lifecycle as plain functions over a Session: create, pause, resume, abort, throttle, complete,
progress. No HTTP here, so the API, the worker and the CLI share one implementation.

Status machine::

    planning --plan job--> running --all tasks done--> completed
        |                   |   ^
        |                   v   |  (pause / resume)
        |                  paused
        +--------+----------+--> aborted (operator)      running --tasks failed at the end--> failed

`active_lock = 1` while planning|running|paused; its unique constraint admits one active rollout, so two
concurrent creates give one success and one `Conflict`. Status changes are published as `events.ROLLOUT`
after their commit. Jobs are enqueued by function path (`PLAN_JOB`, `DRIVER_JOB`), so `service` never
imports `worker`; callers enqueue only after the commit that justifies the job.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass

import redis
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.paths import Choice
from service import events, paths
from service.config import Settings
from service.db import queries
from service.db.models import (
    ACTIVE_ROLLOUT_STATES,
    POLICIES,
    BackfillTask,
    Embedding,
    Item,
    ModelVersion,
    Rollout,
    utcnow,
)
from service.errors import Conflict, InvalidRequest, NotFound
from service.redis_conn import JOB_SERIALIZER, job_queue

log = logging.getLogger(__name__)

RATE_WINDOW_SECONDS = 60.0
MAX_DRIVERS = 16
PLAN_JOB = "worker.plan.plan_rollout"
DRIVER_JOB = "worker.driver.drive_backfill"
TRAIN_JOB = "worker.train.train_rollout"


# --- reads -----------------------------------------------------------------------------------------------
def get_rollout(session: Session, rollout_id: int) -> Rollout:
    rollout = session.get(Rollout, rollout_id, populate_existing=True)
    if rollout is None:
        raise NotFound("id", f"rollout {rollout_id} does not exist")
    return rollout


def list_rollouts(session: Session, limit: int = 100) -> list[Rollout]:
    return list(session.scalars(sa.select(Rollout).order_by(Rollout.id.desc()).limit(limit)))


@dataclass(frozen=True)
class Progress:
    """Counts derived from task states (never stored increments)."""

    total: int
    pending: int
    leased: int
    done: int
    failed: int
    items_per_second: float
    eta_seconds: float | None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    @property
    def remaining(self) -> int:
        return self.pending + self.leased


def task_counts(session: Session, rollout_id: int) -> dict[str, int]:
    rows = session.execute(
        sa.select(BackfillTask.state, sa.func.count())
        .where(BackfillTask.rollout_id == rollout_id)
        .group_by(BackfillTask.state)
    ).all()
    counts = {"pending": 0, "leased": 0, "done": 0, "failed": 0}
    counts.update({state: int(n) for state, n in rows})
    return counts


def _grouped_counts(session: Session, ids: list[int], since: dt.datetime) -> dict[int, tuple[dict[str, int], int]]:
    """Per rollout: task counts per state, and tasks done since `since`; one grouped query for all of them."""
    recent = sa.func.count().filter(BackfillTask.done_at >= since)
    rows = session.execute(
        sa.select(BackfillTask.rollout_id, BackfillTask.state, sa.func.count(), recent)
        .where(BackfillTask.rollout_id.in_(ids))
        .group_by(BackfillTask.rollout_id, BackfillTask.state)
    ).all()
    out = {i: ({"pending": 0, "leased": 0, "done": 0, "failed": 0}, 0) for i in ids}
    for rollout_id, state, n, done_recently in rows:
        counts, done_recent = out[rollout_id]
        counts[state] = int(n)
        out[rollout_id] = (counts, int(done_recently) if state == "done" else done_recent)
    return out


def progresses(session: Session, rollouts: list[Rollout], now: dt.datetime | None = None) -> dict[int, Progress]:
    """Totals, rate over the last minute (from `done_at`) and an ETA at that rate, per rollout (one query)."""
    now = now or utcnow()
    counted = _grouped_counts(session, [r.id for r in rollouts], now - dt.timedelta(seconds=RATE_WINDOW_SECONDS))
    return {r.id: _progress(r, *counted[r.id], now=now) for r in rollouts}


def progress(session: Session, rollout: Rollout, now: dt.datetime | None = None) -> Progress:
    return progresses(session, [rollout], now)[rollout.id]


def _progress(rollout: Rollout, c: dict[str, int], recent: int, now: dt.datetime) -> Progress:
    # A rollout younger than the window is measured over its own age, not diluted over 60 s.
    window = RATE_WINDOW_SECONDS
    if rollout.started_at is not None:
        age = (now - rollout.started_at).total_seconds()
        window = min(window, max(age, 1.0))
    rate = recent / window
    remaining = c["pending"] + c["leased"]
    if remaining == 0 and rollout.status not in ("training", "planning"):  # no tasks yet is not "done"
        eta: float | None = 0.0
    elif rate > 0 and rollout.status == "running":
        eta = remaining / rate
    else:
        eta = None
    total = sum(c.values())
    return Progress(total, c["pending"], c["leased"], c["done"], c["failed"], rate, eta)


@dataclass(frozen=True)
class RolloutView:
    """A rollout and its progress at one instant, rounded as reported (API responses, gauges)."""

    rollout: Rollout
    progress: Progress

    @property
    def fraction(self) -> float:
        return round(self.progress.fraction, 6)

    @property
    def items_per_second(self) -> float:
        return round(self.progress.items_per_second, 3)

    @property
    def eta_seconds(self) -> float | None:
        eta = self.progress.eta_seconds
        return None if eta is None else round(eta, 1)


def rollout_view(session: Session, rollout: Rollout) -> RolloutView:
    """The rollout with its progress now (the API shapes it into JSON)."""
    return RolloutView(rollout, progress(session, rollout))


def rollout_views(session: Session, rollouts: list[Rollout]) -> list[RolloutView]:
    """Several rollouts with their progress, counted in one grouped query (not one scan per rollout)."""
    counted = progresses(session, rollouts)
    return [RolloutView(r, counted[r.id]) for r in rollouts]


def export_progress(view: RolloutView) -> None:
    """Set the rollout gauges from a rollout view (the active rollout, or the one that just ended)."""
    from service import metrics

    p = view.progress
    metrics.ROLLOUT_TOTAL.set(p.total)
    metrics.ROLLOUT_DONE.set(p.done)
    metrics.ROLLOUT_FAILED.set(p.failed)
    metrics.ROLLOUT_PENDING.set(max(0, p.total - p.done - p.failed))
    metrics.ROLLOUT_PROGRESS_RATIO.set(view.fraction)
    metrics.ROLLOUT_ITEMS_PER_SECOND.set(view.items_per_second)
    metrics.ROLLOUT_ETA_SECONDS.set(-1 if view.eta_seconds is None else view.eta_seconds)


def refresh_progress_metrics(session: Session) -> RolloutView | None:
    """Export the progress of the active rollout, else of the newest one; None when there is none."""
    rollout = queries.active_rollout(session) or session.scalars(sa.select(Rollout).order_by(Rollout.id.desc())).first()
    if rollout is None:
        return None
    view = rollout_view(session, rollout)
    export_progress(view)
    from service.pages import export_failure_reasons

    export_failure_reasons(session, rollout.id)
    return view


# --- writes ----------------------------------------------------------------------------------------------
def _publish(r: redis.Redis | None, rollout: Rollout) -> None:
    if r is not None:
        events.publish(r, events.ROLLOUT, rollout_id=rollout.id, status=rollout.status)


def _validate_throttle(value: float | None) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InvalidRequest("max_items_per_second", "must be a positive number or null")
    return float(value)


def create_rollout(
    session: Session,
    settings: Settings,
    *,
    to: str,
    mode: str = "auto",
    policy: str = "uncertainty",
    batch_size: int | None = None,
    max_items_per_second: float | None = None,
    force: bool = False,
    r: redis.Redis | None = None,
) -> Rollout:
    """Validate and insert a rollout in `planning` (or `training` when the pair has no compat pack yet: a
    worker trains one on the gallery first); the caller enqueues the next job after this returns.
    `mode` is a preference: `auto` or a path (service/paths.py chooses or refuses it)."""
    plan = plan_upgrade(session, settings, to, mode, policy, batch_size, max_items_per_second, force)
    rollout = Rollout(
        from_version=plan.current,
        to_version=to,
        status=plan.status,
        batch_size=batch_size or settings.batch_size,
        max_items_per_second=plan.throttle,
        purge_on_abort=settings.purge_on_abort,
        active_lock=1,
    )
    paths.apply_choice(rollout, plan.choice, mode)
    if plan.status == "training":
        rollout.training = {"sample": settings.train_sample, "sample_done": 0}
    session.add(rollout)
    try:
        session.commit()
    except IntegrityError as e:
        # Lost the race on uq_rollouts_active_lock against a concurrent create.
        session.rollback()
        raise Conflict("rollout", "another rollout is already active") from e
    _publish(r, rollout)
    return rollout


@dataclass(frozen=True)
class UpgradePlan:
    """What `create_rollout` would insert: from which model, in which status, on which path."""

    current: str
    status: str  # planning, or training (no compat pack for the pair yet)
    choice: Choice
    throttle: float | None


def plan_upgrade(
    session: Session,
    settings: Settings,
    to: str,
    mode: str,
    policy: str,
    batch_size: int | None,
    max_items_per_second: float | None,
    force: bool,
) -> UpgradePlan:
    """Every check of an upgrade and its path choice, writing nothing (also `POST /upgrade?dry_run=true`)."""
    if mode not in paths.PREFERENCES:
        raise InvalidRequest("mode", f"must be one of {', '.join(paths.PREFERENCES)}")
    if policy not in POLICIES:
        raise InvalidRequest("policy", f"must be one of {', '.join(POLICIES)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not 1 <= batch_size <= 100_000):
        raise InvalidRequest("batch_size", "must be an integer between 1 and 100000")
    throttle = _validate_throttle(max_items_per_second)
    target = session.get(ModelVersion, to)
    if target is None:
        raise InvalidRequest("to", f"model {to!r} is not registered")
    current = queries.serving_model(session)
    if current is None:
        raise Conflict("to", "no model is serving; register artifacts first")
    if current.name == to:
        raise InvalidRequest("to", f"model {to!r} is already serving")
    running = queries.active_rollout(session)
    if running is not None:
        raise Conflict("rollout", f"rollout {running.id} is {running.status}; pause/abort it or wait")
    if queries.compat_pack(session, current.name, to) is None:
        choice, status = paths.while_training(mode, policy), "training"
    else:
        choice, status = paths.choose_path(session, settings, current.name, to, mode, policy, force), "planning"
    return UpgradePlan(current.name, status, choice, throttle)


def _lock(session: Session, rollout_id: int) -> Rollout:
    rollout = queries.lock_rollout(session, rollout_id)
    if rollout is None:
        session.rollback()
        raise NotFound("id", f"rollout {rollout_id} does not exist")
    return rollout


def pause(session: Session, rollout_id: int, r: redis.Redis | None = None) -> Rollout:
    """Drivers stop between batches; idempotent on a paused rollout."""
    rollout = _lock(session, rollout_id)
    if rollout.status == "paused":
        session.commit()
        return rollout
    if rollout.status not in ("training", "planning", "running"):
        session.rollback()
        raise Conflict("status", f"rollout {rollout_id} is {rollout.status}; only an active one can pause")
    rollout.status = "paused"
    session.commit()
    _publish(r, rollout)
    return rollout


def resume(session: Session, rollout_id: int, r: redis.Redis | None = None) -> Rollout:
    """Back to running (or to planning when it was paused before its plan finished); the caller
    re-enqueues the plan or the drivers."""
    rollout = _lock(session, rollout_id)
    if rollout.status in ("training", "running", "planning"):
        session.commit()
        return rollout
    if rollout.status != "paused":
        session.rollback()
        raise Conflict("status", f"rollout {rollout_id} is {rollout.status}; only a paused one can resume")
    if paths.still_training(rollout):
        rollout.status = "training"
    else:
        rollout.status = "running" if rollout.started_at is not None else "planning"
    session.commit()
    _publish(r, rollout)
    return rollout


def set_throttle(session: Session, rollout_id: int, max_items_per_second: float | None) -> Rollout:
    """Set (or clear with None) the rollout-wide rate limit; drivers read it before every batch."""
    return update(session, None, rollout_id, throttle=(max_items_per_second,))


def update(
    session: Session,
    settings: Settings | None,
    rollout_id: int,
    *,
    throttle: tuple[float | None] | None = None,
    mode: str | None = None,
    force: bool = False,
    r: redis.Redis | None = None,
) -> Rollout:
    """`PATCH /rollouts/{id}` in one transaction: the throttle (`(value,)`, value None = clear) and/or the
    path (`mode`: auto or a path, refused with 409 when predicted to dip unless `force`)."""
    value = _validate_throttle(throttle[0]) if throttle is not None else None
    rollout = _lock(session, rollout_id)
    if rollout.status not in ACTIVE_ROLLOUT_STATES:
        session.rollback()
        raise Conflict("status", f"rollout {rollout_id} is {rollout.status}; only an active one can change")
    if throttle is not None:
        rollout.max_items_per_second = value
    if mode is not None and settings is not None:
        try:
            paths.change_path(session, settings, rollout, mode, force, r)
        except Exception:
            session.rollback()
            raise
    session.commit()
    if mode is not None:
        _publish(r, rollout)
    return rollout


def abort(
    session: Session,
    rollout_id: int,
    purge: bool | None = None,
    r: redis.Redis | None = None,
) -> Rollout:
    """Stop the rollout; the old model stays serving. `purge` (default: the rollout's `purge_on_abort`)
    deletes the target model's embeddings in the same transaction."""
    rollout = _lock(session, rollout_id)  # waits for in-flight batch commits (they hold FOR SHARE)
    if rollout.status not in ACTIVE_ROLLOUT_STATES:
        session.rollback()
        raise Conflict("status", f"rollout {rollout_id} is {rollout.status}; only an active one can abort")
    now = utcnow()
    rollout.status = "aborted"
    rollout.active_lock = None
    rollout.finished_at = now
    old = session.get(ModelVersion, rollout.from_version)
    if old is not None and old.status != "serving":
        old.status = "serving"
    new = session.get(ModelVersion, rollout.to_version)
    if new is not None and new.status == "serving":
        new.status = "registered"
    if rollout.purge_on_abort if purge is None else purge:
        session.execute(sa.delete(Embedding).where(Embedding.model_version == rollout.to_version))
    session.commit()
    _publish(r, rollout)
    if r is not None:
        events.publish(r, events.EMBEDDINGS, rollout_id=rollout.id)
    return rollout


def complete(session: Session, settings: Settings, rollout_id: int, r: redis.Redis | None = None) -> Rollout | None:
    """Finish a running rollout whose tasks are all done or failed, in one transaction. Returns the rollout
    when this call finished it, None when it was not finishable (tasks left, or not running)."""
    rollout = _lock(session, rollout_id)
    if rollout.status != "running":
        session.rollback()
        return None
    c = task_counts(session, rollout_id)
    if c["pending"] or c["leased"]:
        session.rollback()
        return None
    if requeue_missing(session, rollout):  # the rollout goes on: those items get their vector first
        session.commit()
        _publish(r, rollout)
        return None
    now = utcnow()
    rollout.active_lock = None
    rollout.finished_at = now
    if c["failed"]:
        # Completing would leave the failed items in neither index: keep the old model serving.
        rollout.status = "failed"
        rollout.error = (
            f"{c['failed']} item(s) failed after {settings.max_attempts} attempts (see backfill_tasks."
            f"last_error); {rollout.from_version} stays serving. Fix or delete them and upgrade again."
        )
    else:
        rollout.status = "completed"
        session.execute(
            sa.update(ModelVersion).where(ModelVersion.name == rollout.from_version).values(status="retired")
        )
        session.execute(sa.update(ModelVersion).where(ModelVersion.name == rollout.to_version).values(status="serving"))
    session.commit()
    _publish(r, rollout)
    if rollout.status == "completed":
        sweep_retired_embeddings(session, settings, now=now)
    return rollout


def requeue_missing(session: Session, rollout: Rollout) -> int:
    """Before a rollout completes: every live item must have a target vector. An item written while the
    rollout started (its writer read the layout before the rollout existed, the plan scanned before the item
    committed) has neither a vector nor a task; a done task without a vector belongs to an item deleted and
    revived meanwhile. Give each a pending task, ahead of everything else; returns how many. Items whose task
    failed are left to end the rollout `failed`."""
    has_target = sa.exists().where(Embedding.item_id == Item.id, Embedding.model_version == rollout.to_version)
    task_state = (
        sa.select(BackfillTask.state)
        .where(BackfillTask.rollout_id == rollout.id, BackfillTask.item_id == Item.id)
        .scalar_subquery()
    )
    rows = session.execute(sa.select(Item.id, task_state).where(Item.deleted_at.is_(None), ~has_target)).tuples()
    pairs: list[tuple[int, str | None]] = [(int(i), state) for i, state in rows]
    done = [i for i, state in pairs if state == "done"]
    fresh = [i for i, state in pairs if state is None]
    if not done and not fresh:
        return 0
    top = session.scalar(sa.select(sa.func.max(BackfillTask.priority)).where(BackfillTask.rollout_id == rollout.id))
    priority, now = float(top or 0.0) + 1.0, utcnow()
    if done:
        session.execute(
            sa.update(BackfillTask)
            .where(BackfillTask.rollout_id == rollout.id, BackfillTask.item_id.in_(done))
            .values(state="pending", attempts=0, priority=priority, done_at=None, updated_at=now)
        )
    session.add_all(
        BackfillTask(rollout_id=rollout.id, item_id=i, priority=priority, state="pending", attempts=0) for i in fresh
    )
    log.warning(
        "rollout %s: %d live item(s) without a %s vector at completion: re-queued",
        rollout.id,
        len(done) + len(fresh),
        rollout.to_version,
    )
    return len(done) + len(fresh)


def sweep_retired_embeddings(session: Session, settings: Settings, now: dt.datetime | None = None) -> int:
    """Delete a retired model's embeddings once `old_embedding_retention_days` have passed since the
    rollout that retired it completed. Returns the number of rows deleted."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=settings.old_embedding_retention_days)
    retired = session.scalars(
        sa.select(Rollout.from_version)
        .join(ModelVersion, ModelVersion.name == Rollout.from_version)
        .where(Rollout.status == "completed", Rollout.finished_at <= cutoff, ModelVersion.status == "retired")
        .distinct()
    ).all()
    deleted = 0
    for version in retired:
        # Not while a rollout back to (or from) that model runs: it is writing or reading those vectors. One
        # statement, so a rollout committed after it started writes rows this delete cannot see.
        in_use = sa.exists().where(
            Rollout.active_lock == 1, sa.or_(Rollout.to_version == version, Rollout.from_version == version)
        )
        res = session.execute(sa.delete(Embedding).where(Embedding.model_version == version, ~in_use))
        deleted += int(getattr(res, "rowcount", 0) or 0)
    session.commit()
    if deleted:
        log.info("retention sweep deleted %d embeddings of %s", deleted, ", ".join(retired))
    return deleted


# --- jobs (enqueued by function path; see worker/plan.py and worker/driver.py) ---------------------------
def plan_job_id(rollout_id: int) -> str:
    return f"backfill-plan-{rollout_id}"


def train_job_id(rollout_id: int) -> str:
    return f"backfill-train-{rollout_id}"


def driver_job_id(rollout_id: int, slot: int) -> str:
    return f"backfill-drive-{rollout_id}-{slot}"


def driver_heartbeat_key(job_id: str) -> str:
    return f"backfill:heartbeat:{job_id}"


def _enqueue_unique(r: redis.Redis, settings: Settings, func: str, rollout_id: int, job_id: str) -> bool:
    """Enqueue unless a job with this id is queued or running (a running one proves it by its heartbeat key,
    so the job of a SIGKILLed worker is replaced). True when enqueued."""
    from rq.exceptions import DuplicateJobError, NoSuchJobError
    from rq.job import Job, JobStatus

    try:
        job = Job.fetch(job_id, connection=r, serializer=JOB_SERIALIZER)
    except NoSuchJobError:
        job = None
    if job is not None:
        status = job.get_status(refresh=False)
        if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED):
            return False
        if status == JobStatus.STARTED and r.exists(driver_heartbeat_key(job_id)):
            return False
        job.delete(remove_from_queue=True)
    queue = job_queue(r, settings)
    try:
        queue.enqueue_call(
            func,
            args=(rollout_id,),
            job_id=job_id,
            timeout=-1,  # drivers run until their rollout has no work left
            result_ttl=0,
            failure_ttl=24 * 3600,
            unique=True,
        )
    except DuplicateJobError:
        return False
    return True


def enqueue_plan(r: redis.Redis, settings: Settings, rollout_id: int) -> bool:
    return _enqueue_unique(r, settings, PLAN_JOB, rollout_id, plan_job_id(rollout_id))


def driver_slots(r: redis.Redis, settings: Settings) -> int:
    """One driver per live worker on the queue (at least one): each worker runs one job at a time."""
    from rq import Worker

    n = Worker.count(connection=r, queue=job_queue(r, settings))
    return max(1, min(MAX_DRIVERS, n))


def enqueue_drivers(r: redis.Redis, settings: Settings, rollout_id: int, slots: int | None = None) -> int:
    """Make sure `slots` backfill drivers exist for the rollout; returns how many were enqueued."""
    n = slots if slots is not None else driver_slots(r, settings)
    return sum(
        _enqueue_unique(r, settings, DRIVER_JOB, rollout_id, driver_job_id(rollout_id, slot)) for slot in range(n)
    )


def enqueue_for(r: redis.Redis, settings: Settings, rollout: Rollout) -> None:
    """Whatever job the rollout's status needs next (plan or drivers); nothing for a stopped one."""
    if rollout.status == "training":
        _enqueue_unique(r, settings, TRAIN_JOB, rollout.id, train_job_id(rollout.id))
    elif rollout.status == "planning":
        enqueue_plan(r, settings, rollout.id)
    elif rollout.status == "running":
        enqueue_drivers(r, settings, rollout.id)
