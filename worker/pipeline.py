"""The backfill batch stages the driver (`worker.driver`) runs, on three threads: load, encode, commit.

Same contract as `worker.backfill` (claim under a lease with FOR UPDATE SKIP LOCKED; one commit transaction
that marks done only the tasks still held under the claim's token, takes FOR SHARE on the rollout row and
inserts embeddings ON CONFLICT DO NOTHING), with fewer round trips and less Python per item on Postgres:

* `load_batch` (the loader thread): on Postgres one statement reaps orphans (`worker.backfill.reap_orphans`),
  claims the batch and returns its payloads: MATERIALIZED CTEs pick and lock the ids once, pending and expired
  tasks each down the claim index (`ix_backfill_tasks_claim`: no scan of every pending task when the
  planner knows the table), and the UPDATE ... RETURNING joins the items; SQLite uses `worker.backfill.claim`
  and a second query. It decodes with `worker.pngdecode` and fits every image to the
  target model's input spec, so the encoder thread gets one uint8 array and does nothing but run the model;
* `encode_loaded` (the driver thread): the model over that array, one call;
* `finish_loaded` (the committer thread): `worker.backfill.commit_batch`, which on Postgres passes ids and
  vectors as two arrays (`unnest`): one statement for the live-item check and the insert.

Every stage records into `ctx.stages` when set (see `worker.stages`).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.artifacts import Encoder
from models.preprocess import InputSpec, InvalidImage
from service import events, metrics
from service.db.models import Item, ModelVersion, Rollout, utcnow
from worker import backfill
from worker.backfill import BatchResult, Claimed, Prepared
from worker.context import WorkerContext
from worker.pngdecode import decode_payload
from worker.stages import timed

log = logging.getLogger(__name__)

Row = tuple[int, int, bytes | None, bool]  # task id, item id, payload, deleted

_CLAIM_LOAD = sa.text(
    """
    WITH reaped AS (
        UPDATE backfill_tasks
        SET state = 'failed', lease_expires_at = NULL, last_error = COALESCE(last_error || '; ', '') || :reason,
            updated_at = :now
        WHERE rollout_id = :rollout_id AND state = 'leased' AND lease_expires_at < :now
          AND attempts >= :max_attempts
    ), pending AS MATERIALIZED (
        SELECT id, priority FROM backfill_tasks
        WHERE rollout_id = :rollout_id AND state = 'pending'
        ORDER BY priority DESC, id
        LIMIT :n
        FOR UPDATE SKIP LOCKED
    ), expired AS MATERIALIZED (
        SELECT id, priority FROM backfill_tasks
        WHERE rollout_id = :rollout_id AND state = 'leased' AND lease_expires_at < :now
          AND attempts < :max_attempts
        ORDER BY priority DESC, id
        LIMIT :n
        FOR UPDATE SKIP LOCKED
    ), picked AS (
        SELECT id FROM (SELECT id, priority FROM pending UNION ALL SELECT id, priority FROM expired) AS c
        ORDER BY priority DESC, id
        LIMIT :n
    ), claimed AS (
        UPDATE backfill_tasks AS t
        SET state = 'leased', leased_by = :token, lease_expires_at = :expires, attempts = t.attempts + 1,
            updated_at = :now
        FROM picked WHERE t.id = picked.id
        RETURNING t.id, t.item_id
    )
    SELECT c.id, c.item_id, i.payload, i.deleted_at IS NOT NULL
    FROM claimed AS c LEFT JOIN items AS i ON i.id = c.item_id
    """
)


@dataclass
class Loaded(Prepared):
    """A claimed batch, decoded and fitted: `batch` holds one uint8 model input per id in `ids`."""

    batch: np.ndarray | None = None
    encoder: Encoder | None = None


# --- claim + payload load -------------------------------------------------------------------------------
def claim_rows(session: Session, ctx: WorkerContext, rollout_id: int, n: int) -> tuple[Claimed, list[Row] | None]:
    """Lease up to `n` tasks (as `worker.backfill.claim`) and, on Postgres, read their items in the same
    statement; on SQLite the rows are None (`item_rows` reads them)."""
    if not ctx.is_postgres:
        return backfill.claim(session, ctx, rollout_id, n), None
    now = utcnow()
    token = f"{ctx.worker_id}:{uuid.uuid4().hex[:12]}"
    params = {
        "rollout_id": rollout_id,
        "now": now,
        "max_attempts": ctx.settings.max_attempts,
        "n": n,
        "token": token,
        "expires": now + dt.timedelta(seconds=ctx.settings.lease_seconds),
        "reason": f"lease expired after {ctx.settings.max_attempts} attempts: the worker holding it stopped (crash?)",
    }
    result: Sequence[Any] = session.execute(_CLAIM_LOAD, params).all()
    session.commit()
    rows = [(int(t), int(i), p, bool(d) or p is None) for t, i, p, d in result]
    return Claimed(token, {r[0]: r[1] for r in rows}), rows


def item_rows(session: Session, claimed: Claimed) -> list[Row]:
    """The claimed tasks' items (SQLite: a second query after the claim)."""
    task_of = {iid: tid for tid, iid in claimed.tasks.items()}
    found = session.execute(sa.select(Item.id, Item.payload, Item.deleted_at).where(Item.id.in_(list(task_of)))).all()
    return [(task_of[int(i)], int(i), p, d is not None) for i, p, d in found]


def _decode(prep: Loaded, rows: list[Row], spec: InputSpec) -> None:
    """Decode and fit the live items' payloads into `prep.batch`; an invalid payload fails its task alone."""
    images: list[np.ndarray] = []
    for tid, iid, payload, deleted in rows:
        if deleted or payload is None:
            continue  # done without an embedding at commit
        try:
            images.append(spec.fit(decode_payload(payload)))
            prep.ids.append(iid)
        except InvalidImage as e:
            prep.errors[tid] = f"invalid payload: {e}"
    if images:
        prep.batch = np.stack(images)


def _fail_all(prep: Prepared, e: BaseException) -> None:
    prep.errors = {tid: f"{type(e).__name__}: {e}" for tid in prep.claimed.tasks}


def load_batch(ctx: WorkerContext, rollout: Rollout, n: int) -> Loaded:
    """Claim a batch, load its payloads, decode and fit them for the target encoder (deleted items are left
    out: done, no embedding). A failure after the claim fails every task's attempt; a failed claim raises."""
    clock, t0 = ctx.stages, time.perf_counter()
    with ctx.sessionmaker() as s:
        with timed(clock, "claim"):
            claimed, rows = claim_rows(s, ctx, rollout.id, n)
        metrics.WORKER_CLAIM_SECONDS.observe(time.perf_counter() - t0)
        prep = Loaded(claimed, t0)
        if not claimed.tasks:
            return prep
        try:
            if rows is None:
                with timed(clock, "load"):
                    rows = item_rows(s, claimed)
            target = s.get(ModelVersion, rollout.to_version)
            if target is None:
                raise RuntimeError(f"model {rollout.to_version} vanished")
            prep.encoder = ctx.encoder(target)
            with timed(clock, "decode", len(rows)):
                _decode(prep, rows, prep.encoder.spec)
        except Exception as e:  # the whole batch failed: every task gets a failed attempt
            log.exception("preparing a batch of rollout %s failed", rollout.id)
            _fail_all(prep, e)
            prep.batch, prep.ids = None, []
    return prep


# --- encode ---------------------------------------------------------------------------------------------
def encode_loaded(ctx: WorkerContext, rollout: Rollout, prep: Loaded) -> dict[int, np.ndarray]:
    """The target model over the loaded batch; a failure becomes a failed attempt for every task."""
    if prep.batch is None or prep.encoder is None or not prep.ids:
        return {}
    try:
        with timed(ctx.stages, "encode", len(prep.ids)):
            out = prep.encoder.embed(prep.batch, batch_size=len(prep.ids))
        return dict(zip(prep.ids, out, strict=True))
    except Exception as e:
        log.exception("encoding a batch of rollout %s failed", rollout.id)
        _fail_all(prep, e)
        return {}


def finish_loaded(ctx: WorkerContext, rollout: Rollout, prep: Prepared, vectors: dict[int, np.ndarray]) -> BatchResult:
    """Commit a batch (`worker.backfill.commit_batch`), then metrics and the EMBEDDINGS event (as
    `worker.backfill.finish`)."""
    with ctx.sessionmaker() as s, timed(ctx.stages, "commit", len(prep.claimed.tasks)):
        res = backfill.commit_batch(s, ctx, rollout, prep.claimed, vectors, prep.errors)
    if res.embedded:
        metrics.WORKER_ITEMS_TOTAL.labels(model=rollout.to_version).inc(len(res.embedded))
        with timed(ctx.stages, "event"):
            events.publish(ctx.redis, events.EMBEDDINGS, rollout_id=rollout.id, count=len(res.embedded))
    if res.failed:
        metrics.WORKER_FAILURES_TOTAL.labels(model=rollout.to_version).inc(res.failed)
    metrics.WORKER_BATCH_SECONDS.labels(model=rollout.to_version).observe(time.perf_counter() - prep.started)
    return res
