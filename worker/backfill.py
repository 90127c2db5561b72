"""One backfill batch: claim tasks under a lease, load and decode their payloads, embed them with the target
model, commit embeddings and task states in one transaction. `worker.driver` loops over these.

* a claim is one `UPDATE ... WHERE id IN (SELECT ... ORDER BY priority DESC LIMIT n FOR UPDATE SKIP LOCKED)
  RETURNING` that takes `pending` tasks or `leased` ones whose lease expired, and writes a lease token that is
  unique to this claim (`<worker>:<random>`); on SQLite the single statement is serialised by the file's
  write lock;
* the commit marks done only the tasks still leased under that token, then inserts embeddings for exactly
  those items (`ON CONFLICT (item_id, model_version) DO NOTHING`) in the same transaction, holding a
  `FOR SHARE` lock on the rollout row so an abort (`FOR UPDATE`) cannot interleave with it.

`attempts` is counted at claim time. A task whose lease expired after `max_attempts` claims was held by
workers that died with it (OOM, segfault: nothing ran the failure path), so the next claim ends it `failed`
with that reason instead of handing it to a next worker to kill (`reap_orphans`); the rollout then finishes.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.preprocess import InvalidImage, decode
from service import events, metrics
from service.db import queries
from service.db.models import BackfillTask, Embedding, Item, ModelVersion, Rollout, utcnow
from worker.context import WorkerContext
from worker.stages import timed

log = logging.getLogger(__name__)

TASKS = cast(sa.Table, BackfillTask.__table__)


@dataclass
class Claimed:
    token: str
    tasks: dict[int, int]  # task id -> item id


def reap_orphans(session: Session, ctx: WorkerContext, rollout_id: int, now: dt.datetime) -> int:
    """End `failed` the tasks whose lease expired with no attempt left: each claim of them lost its worker."""
    t = TASKS
    result = session.execute(
        sa.update(t)
        .where(
            t.c.rollout_id == rollout_id,
            t.c.state == "leased",
            t.c.lease_expires_at < now,
            t.c.attempts >= ctx.settings.max_attempts,
        )
        .values(
            state="failed",
            lease_expires_at=None,
            last_error=sa.func.coalesce(t.c.last_error + "; ", "")
            + f"lease expired after {ctx.settings.max_attempts} attempts: the worker holding it stopped (crash?)",
            updated_at=now,
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


def claim(session: Session, ctx: WorkerContext, rollout_id: int, n: int) -> Claimed:
    """Lease up to `n` of the highest-priority claimable tasks (pending, or leased with an expired lease and
    attempts left)."""
    now = utcnow()
    t = TASKS
    token = f"{ctx.worker_id}:{uuid.uuid4().hex[:12]}"
    if reap_orphans(session, ctx, rollout_id, now):
        session.commit()
    expired = sa.and_(t.c.state == "leased", t.c.lease_expires_at < now, t.c.attempts < ctx.settings.max_attempts)
    claimable = sa.and_(t.c.rollout_id == rollout_id, sa.or_(t.c.state == "pending", expired))
    pick = sa.select(t.c.id).where(claimable).order_by(t.c.priority.desc(), t.c.id).limit(n)
    values = {
        "state": "leased",
        "leased_by": token,
        "lease_expires_at": now + dt.timedelta(seconds=ctx.settings.lease_seconds),
        "attempts": t.c.attempts + 1,
        "updated_at": now,
    }
    if ctx.is_postgres:
        # Lock first, then update by primary key, in one transaction. (A single UPDATE ... WHERE id IN
        # (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED) may be planned as a nested loop that re-runs the locking
        # subquery per outer row and claims far more than n rows.)
        ids: list[int] = list(session.scalars(pick.with_for_update(skip_locked=True)).all())
        if not ids:
            session.commit()
            return Claimed(token, {})
        stmt = sa.update(t).where(t.c.id.in_(ids)).values(**values).returning(t.c.id, t.c.item_id)
    else:
        # SQLite: one write statement, so the file's write lock is taken before the read (no stale snapshot).
        stmt = (
            sa.update(t)
            .where(t.c.id.in_(pick.scalar_subquery()), claimable)
            .values(**values)
            .returning(t.c.id, t.c.item_id)
        )
    rows: list[Any] = list(session.execute(stmt).all())
    session.commit()
    return Claimed(token, {int(tid): int(iid) for tid, iid in rows})


@dataclass
class BatchResult:
    claimed: int = 0
    embedded: list[int] = field(default_factory=list)  # item ids whose embedding this batch committed
    skipped: int = 0  # deleted items, tasks done without an embedding
    failed: int = 0
    lost_lease: int = 0


def _fail(session: Session, ctx: WorkerContext, token: str, errors: dict[int, str]) -> None:
    """Return failed tasks to pending, or `failed` once their attempts are spent."""
    t = TASKS
    for task_id, err in errors.items():
        session.execute(
            sa.update(t)
            .where(t.c.id == task_id, t.c.leased_by == token, t.c.state == "leased")
            .values(
                state=sa.case((t.c.attempts >= ctx.settings.max_attempts, "failed"), else_="pending"),
                lease_expires_at=None,
                last_error=err[:2000],
                updated_at=utcnow(),
            )
        )


# Postgres: the live-item check and the insert in one statement, ids and vectors passed as two arrays.
_INSERT_LIVE = sa.text(
    """
    WITH src AS (
        SELECT v.item_id, v.vector
        FROM unnest(CAST(:item_ids AS bigint[]), CAST(:vectors AS bytea[])) AS v(item_id, vector)
        JOIN items AS i ON i.id = v.item_id AND i.deleted_at IS NULL
    ), ins AS (
        INSERT INTO embeddings (item_id, model_version, vector, created_at)
        SELECT item_id, :model, vector, :now FROM src ORDER BY item_id
        ON CONFLICT (item_id, model_version) DO NOTHING
    )
    SELECT item_id FROM src
    """
)


def _write_live(
    session: Session,
    ctx: WorkerContext,
    rollout: Rollout,
    item_ids: list[int],
    vectors: dict[int, np.ndarray],
    now: dt.datetime,
) -> list[int]:
    """Insert the target model's vector of each of `item_ids` that is still live and was encoded (a vector
    already there is kept: ON CONFLICT DO NOTHING); returns those item ids."""
    todo = sorted(iid for iid in item_ids if iid in vectors)
    if not todo:
        return []
    with timed(ctx.stages, "write", len(todo)):
        if ctx.is_postgres:
            params = {
                "item_ids": todo,
                "vectors": [vectors[iid].astype("<f4").tobytes() for iid in todo],
                "model": rollout.to_version,
                "now": now,
            }
            return [int(i) for i in session.scalars(_INSERT_LIVE, params).all()]
        live = set(session.scalars(sa.select(Item.id).where(Item.id.in_(todo), Item.deleted_at.is_(None))).all())
        payload = [
            {"item_id": iid, "model_version": rollout.to_version, "vector": vectors[iid].astype("<f4").tobytes()}
            for iid in todo
            if iid in live
        ]
        if payload:  # executemany: one cached statement, batched by the driver ("insertmanyvalues")
            session.execute(
                ctx.insert(Embedding).on_conflict_do_nothing(index_elements=["item_id", "model_version"]),
                payload,
            )
        return [int(cast(int, row["item_id"])) for row in payload]


def commit_batch(
    session: Session,
    ctx: WorkerContext,
    rollout: Rollout,
    claimed: Claimed,
    vectors: dict[int, np.ndarray],
    errors: dict[int, str],
) -> BatchResult:
    """One transaction: mark our still-held tasks done, insert their embeddings (`_write_live`), record
    failures."""
    t = TASKS
    now = utcnow()
    res = BatchResult(claimed=len(claimed.tasks))
    ok_ids = [tid for tid in claimed.tasks if tid not in errors]
    held: dict[int, int] = {}
    if ok_ids:
        rows: Sequence[Any] = session.execute(
            sa.update(t)
            .where(t.c.id.in_(ok_ids), t.c.leased_by == claimed.token, t.c.state == "leased")
            .values(state="done", done_at=now, lease_expires_at=None, updated_at=now)
            .returning(t.c.id, t.c.item_id)
        ).all()
        held = {int(a): int(b) for a, b in rows}
    res.lost_lease = len(ok_ids) - len(held)
    # Serialise against abort/complete, which take FOR UPDATE on the rollout row.
    status = queries.rollout_status(session, rollout.id, for_share=ctx.is_postgres)
    if status not in ("running", "paused"):
        session.rollback()
        res.lost_lease = len(claimed.tasks)
        return res
    if held:
        res.embedded = _write_live(session, ctx, rollout, list(held.values()), vectors, now)
        res.skipped = len(held) - len(res.embedded)
    if errors:
        _fail(session, ctx, claimed.token, errors)
        res.failed = len(errors)
    session.commit()
    return res


@dataclass
class Prepared:
    """A claimed batch, loaded and decoded, ready for the encoder."""

    claimed: Claimed
    started: float
    images: list[np.ndarray] | None = None  # decoded; the target model fits them to its input spec
    ids: list[int] = field(default_factory=list)  # item id per image row
    errors: dict[int, str] = field(default_factory=dict)  # task id -> error


def prepare(ctx: WorkerContext, rollout: Rollout, n: int) -> Prepared:
    """Claim a batch, load its payloads and decode them (deleted items are left out: done, no embedding)."""
    t0 = time.perf_counter()
    with ctx.sessionmaker() as s:
        claimed = claim(s, ctx, rollout.id, n)
    metrics.WORKER_CLAIM_SECONDS.observe(time.perf_counter() - t0)
    prep = Prepared(claimed, t0)
    if not claimed.tasks:
        return prep
    task_of = {iid: tid for tid, iid in claimed.tasks.items()}
    try:
        with ctx.sessionmaker() as s:
            rows = s.execute(sa.select(Item.id, Item.payload, Item.deleted_at).where(Item.id.in_(list(task_of)))).all()
        images = []
        for iid, payload, deleted_at in rows:
            if deleted_at is not None:
                continue
            try:
                images.append(decode(payload))
                prep.ids.append(int(iid))
            except InvalidImage as e:
                prep.errors[task_of[int(iid)]] = f"invalid payload: {e}"
        if images:
            prep.images = images
    except Exception as e:  # the whole batch failed: every task gets a failed attempt
        log.exception("loading a batch of rollout %s failed", rollout.id)
        prep.errors = {tid: f"{type(e).__name__}: {e}" for tid in claimed.tasks}
        prep.images, prep.ids = None, []
    return prep


def encode(ctx: WorkerContext, rollout: Rollout, prep: Prepared) -> dict[int, np.ndarray]:
    """Embed a prepared batch with the target model; a failure becomes a failed attempt for every task."""
    if prep.images is None or not prep.ids:
        return {}
    try:
        with ctx.sessionmaker() as s:
            target = s.get(ModelVersion, rollout.to_version)
        if target is None:
            raise RuntimeError(f"model {rollout.to_version} vanished")
        out = ctx.encoder(target).embed(prep.images, batch_size=len(prep.ids))
        return dict(zip(prep.ids, out, strict=True))
    except Exception as e:
        log.exception("encoding a batch of rollout %s failed", rollout.id)
        prep.errors = {tid: f"{type(e).__name__}: {e}" for tid in prep.claimed.tasks}
        return {}


def finish(ctx: WorkerContext, rollout: Rollout, prep: Prepared, vectors: dict[int, np.ndarray]) -> BatchResult:
    """Commit a batch (see `commit_batch`), then metrics and the EMBEDDINGS event."""
    with ctx.sessionmaker() as s:
        res = commit_batch(s, ctx, rollout, prep.claimed, vectors, prep.errors)
    if res.embedded:
        metrics.WORKER_ITEMS_TOTAL.labels(model=rollout.to_version).inc(len(res.embedded))
        events.publish(ctx.redis, events.EMBEDDINGS, rollout_id=rollout.id, count=len(res.embedded))
    if res.failed:
        metrics.WORKER_FAILURES_TOTAL.labels(model=rollout.to_version).inc(res.failed)
    metrics.WORKER_BATCH_SECONDS.labels(model=rollout.to_version).observe(time.perf_counter() - prep.started)
    return res


def release(ctx: WorkerContext, claimed: Claimed) -> None:
    """Give back a claimed batch that will not be processed (prefetched when the driver stopped)."""
    if not claimed.tasks:
        return
    t = TASKS
    with ctx.sessionmaker() as s:
        s.execute(
            sa.update(t)
            .where(t.c.id.in_(list(claimed.tasks)), t.c.leased_by == claimed.token, t.c.state == "leased")
            .values(state="pending", lease_expires_at=None, attempts=t.c.attempts - 1, updated_at=utcnow())
        )
        s.commit()


def run_batch(ctx: WorkerContext, rollout: Rollout, n: int) -> BatchResult:
    """Claim, load, embed and commit one batch, sequentially."""
    prep = prepare(ctx, rollout, n)
    if not prep.claimed.tasks:
        return BatchResult()
    return finish(ctx, rollout, prep, encode(ctx, rollout, prep))
