"""RQ jobs of a rollout: `plan_rollout` (priorities -> tasks) and `drive_backfill` (claim, embed, commit).

Jobs take a rollout id, re-fetch rows and return quietly when a row vanished or the rollout stopped.

Driver design. A driver is a loop bound to one rollout: read the rollout (stop unless `running`), honour the
throttle, claim a batch, embed it, commit it, repeat. Several drivers (one job id per slot,
`backfill-drive-<rollout>-<slot>`, one slot per live worker) share the work safely because:

* a claim is one `UPDATE ... WHERE id IN (SELECT ... ORDER BY priority DESC LIMIT n FOR UPDATE SKIP LOCKED)
  RETURNING` that takes `pending` tasks or `leased` ones whose lease expired, and writes a lease token that is
  unique to this claim (`<worker>:<random>`); on SQLite the single statement is serialised by the file's
  write lock;
* the commit marks done only the tasks still leased under that token, then inserts embeddings for exactly
  those items (`ON CONFLICT (item_id, model_version) DO NOTHING`) in the same transaction, holding a
  `FOR SHARE` lock on the rollout row so an abort (`FOR UPDATE`) cannot interleave with it;
* a SIGKILLed worker's leases simply expire and are claimed again; its driver job id is re-enqueued by any
  live worker's maintenance loop once the job's heartbeat key (refreshed by a thread while a job runs)
  has expired;
* when nothing is claimable a driver waits for other drivers' leases to finish or expire, and completes the
  rollout only when no task is pending or leased (the completion re-checks under the rollout row lock).

`attempts` is counted at claim time, so an item that crashes its worker also ends `failed` after
`max_attempts` claims instead of killing workers forever.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import redis
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from models.artifacts import CompatPack, Encoder, load_compat, load_encoder, pick_device
from models.preprocess import InvalidImage, preprocess
from service import events, metrics
from service import rollouts as domain
from service.config import REPO_ROOT, Settings, get_settings
from service.db import make_engine, make_sessionmaker
from service.db.models import BackfillTask, Embedding, Item, ModelVersion, Rollout, utcnow
from service.db.models import CompatPack as CompatPackRow
from service.redis_conn import make_redis

log = logging.getLogger(__name__)

TASKS = cast(sa.Table, BackfillTask.__table__)
NO_V1_PRIORITY = 1e30  # items without an old vector are searchable nowhere: backfill them first
IDLE_POLL_SECONDS = 0.5
INSERT_CHUNK = 5000


# --- per-process context: one engine, one Redis client, models loaded once ------------------------------
@dataclass
class WorkerContext:
    settings: Settings
    sessionmaker: sessionmaker[Session]
    redis: redis.Redis
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    stop: threading.Event = field(default_factory=threading.Event)
    _encoders: dict[tuple[str, str], Encoder] = field(default_factory=dict)
    _packs: dict[tuple[str, str, str], CompatPack] = field(default_factory=dict)
    _device: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def is_postgres(self) -> bool:
        return not self.settings.is_sqlite

    @property
    def device(self) -> str:
        # Resolved lazily, on first use inside a job: CUDA is never initialised before a fork.
        if self._device is None:
            self._device = pick_device(self.settings.use_gpu)
        return self._device

    def resolve(self, artifact_path: str) -> Path:
        p = Path(artifact_path)
        if p.is_absolute():
            return p
        for base in (self.settings.artifacts_dir, self.settings.artifacts_dir.parent, REPO_ROOT):
            if (base / p).exists():
                return base / p
        return self.settings.artifacts_dir / p

    def encoder(self, mv: ModelVersion) -> Encoder:
        key = (mv.name, mv.checksum)
        with self._lock:
            if key not in self._encoders:
                log.info("loading encoder %s from %s on %s", mv.name, mv.artifact_path, self.device)
                self._encoders[key] = load_encoder(self.resolve(mv.artifact_path), device=self.device)
                # Export the model's series at zero before its first batch, so rate() sees the first
                # increase (a series born at its final value has no rate).
                metrics.WORKER_ITEMS_TOTAL.labels(model=mv.name)
                metrics.WORKER_FAILURES_TOTAL.labels(model=mv.name)
                metrics.WORKER_BATCH_SECONDS.labels(model=mv.name)
            return self._encoders[key]

    def compat(self, row: CompatPackRow) -> CompatPack:
        key = (row.from_version, row.to_version, row.checksum)
        with self._lock:
            if key not in self._packs:
                self._packs[key] = load_compat(self.resolve(row.artifact_path), device=self.device)
            return self._packs[key]


_context: WorkerContext | None = None
_context_lock = threading.Lock()


def configure(settings: Settings, r: redis.Redis | None = None) -> WorkerContext:
    """Set this process's context (the worker entry point and tests call it; jobs otherwise build one
    from the environment on first use)."""
    global _context
    with _context_lock:
        engine = make_engine(settings)
        _context = WorkerContext(settings, make_sessionmaker(engine), r or make_redis(settings))
        return _context


def get_context() -> WorkerContext:
    if _context is None:
        return configure(get_settings())
    return _context


# --- heartbeat: proves a started job is alive (see service.rollouts._enqueue_unique) --------------------
@contextmanager
def _heartbeat(ctx: WorkerContext) -> Iterator[None]:
    from rq import get_current_job

    job = get_current_job()
    if job is None:  # called directly (tests, bench): nothing to prove
        yield
        return
    key = domain.driver_heartbeat_key(job.id)
    ttl = max(2, int(ctx.settings.lease_seconds + 0.999))
    done = threading.Event()

    def beat() -> None:
        while True:
            try:
                ctx.redis.set(key, ctx.worker_id, ex=ttl)
            except redis.RedisError as e:
                log.warning("heartbeat failed: %s", e)
            if done.wait(ttl / 3):
                return

    t = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join(timeout=2)
        with suppress(redis.RedisError):
            ctx.redis.delete(key)


# --- plan -----------------------------------------------------------------------------------------------
def _insert(ctx: WorkerContext, model: Any) -> Any:
    return postgresql.insert(model) if ctx.is_postgres else sqlite.insert(model)


def compute_priorities(session: Session, ctx: WorkerContext, rollout: Rollout, item_ids: np.ndarray) -> np.ndarray:
    """Priority per item (higher = earlier) from the rollout's policy."""
    if rollout.policy == "fifo":
        return -item_ids.astype(np.float64)
    if rollout.policy == "random":
        return np.random.default_rng(rollout.id).random(len(item_ids))
    # uncertainty: sigma of the compat pack over the stored old vectors; no new-model pass needed.
    pack_row = session.scalars(
        sa.select(CompatPackRow).where(
            CompatPackRow.from_version == rollout.from_version, CompatPackRow.to_version == rollout.to_version
        )
    ).one()
    pack = ctx.compat(pack_row)
    pos = {int(i): k for k, i in enumerate(item_ids)}
    out = np.full(len(item_ids), NO_V1_PRIORITY, dtype=np.float64)
    chunk = ctx.settings.rebuild_batch_size
    rows = session.execute(
        sa.select(Embedding.item_id, Embedding.vector)
        .join(Item, Item.id == Embedding.item_id)
        .where(Embedding.model_version == rollout.from_version, Item.deleted_at.is_(None))
        .execution_options(yield_per=chunk)
    )
    for part in rows.partitions(chunk):
        idx = [pos[i] for i, _ in part if i in pos]
        vecs = np.stack([np.frombuffer(v, dtype="<f4") for i, v in part if i in pos])
        if idx:
            sigma = pack.uncertainty(vecs).astype(np.float64)
            out[idx] = np.where(np.isfinite(sigma), sigma, NO_V1_PRIORITY)
    return out


def plan_rollout(rollout_id: int) -> dict[str, Any]:
    """Insert one task per live item (idempotent), set the rollout running, enqueue its drivers."""
    ctx = get_context()
    with _heartbeat(ctx), ctx.sessionmaker() as s:
        rollout = s.get(Rollout, rollout_id)
        if rollout is None:
            log.warning("plan: rollout %s vanished", rollout_id)
            return {"rollout_id": rollout_id, "planned": 0}
        if rollout.started_at is not None or rollout.status not in ("planning", "paused"):
            if rollout.status == "running":
                domain.enqueue_drivers(ctx.redis, ctx.settings, rollout_id)
            return {"rollout_id": rollout_id, "planned": 0}
        t0 = time.perf_counter()
        item_ids = np.array(
            s.scalars(sa.select(Item.id).where(Item.deleted_at.is_(None)).order_by(Item.id)).all(),
            dtype=np.int64,
        )
        already = set(
            s.scalars(sa.select(Embedding.item_id).where(Embedding.model_version == rollout.to_version)).all()
        )
        priorities = compute_priorities(s, ctx, rollout, item_ids) if len(item_ids) else np.zeros(0)
        rows = [
            {
                "rollout_id": rollout_id,
                "item_id": int(i),
                "priority": float(p),
                # Items that already have a target vector (added during the rollout) need no pass.
                "state": "done" if int(i) in already else "pending",
                "attempts": 0,
            }
            for i, p in zip(item_ids, priorities, strict=True)
        ]
        for k in range(0, len(rows), INSERT_CHUNK):
            s.execute(_insert(ctx, BackfillTask).values(rows[k : k + INSERT_CHUNK]).on_conflict_do_nothing())
        now = utcnow()
        s.execute(
            sa.update(Rollout)
            .where(Rollout.id == rollout_id)
            .values(
                started_at=now,
                updated_at=now,
                status=sa.case((Rollout.status == "planning", "running"), else_=Rollout.status),
            )
        )
        s.commit()
        rollout = domain.get_rollout(s, rollout_id)
        log.info(
            "planned rollout %s: %d tasks (%s) in %.2fs",
            rollout_id,
            len(rows),
            rollout.policy,
            time.perf_counter() - t0,
        )
        events.publish(ctx.redis, events.ROLLOUT, rollout_id=rollout_id, status=rollout.status)
        if rollout.status == "running":
            domain.enqueue_drivers(ctx.redis, ctx.settings, rollout_id)
        return {"rollout_id": rollout_id, "planned": len(rows)}


# --- claim / embed / commit -----------------------------------------------------------------------------
@dataclass
class Claimed:
    token: str
    tasks: dict[int, int]  # task id -> item id


def claim(session: Session, ctx: WorkerContext, rollout_id: int, n: int) -> Claimed:
    """Lease up to `n` of the highest-priority claimable tasks (pending, or leased with an expired lease)."""
    now = utcnow()
    t = TASKS
    token = f"{ctx.worker_id}:{uuid.uuid4().hex[:12]}"
    claimable = sa.and_(
        t.c.rollout_id == rollout_id,
        sa.or_(t.c.state == "pending", sa.and_(t.c.state == "leased", t.c.lease_expires_at < now)),
    )
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


def commit_batch(
    session: Session,
    ctx: WorkerContext,
    rollout: Rollout,
    claimed: Claimed,
    vectors: dict[int, np.ndarray],
    errors: dict[int, str],
) -> BatchResult:
    """One transaction: mark our still-held tasks done, upsert their embeddings, record failures."""
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
    lock = sa.select(Rollout.status).where(Rollout.id == rollout.id)
    if ctx.is_postgres:
        lock = lock.with_for_update(read=True)
    status = session.scalar(lock)
    if status not in ("running", "paused"):
        session.rollback()
        res.lost_lease = len(claimed.tasks)
        return res
    if held:
        live = set(
            session.scalars(sa.select(Item.id).where(Item.id.in_(list(held.values())), Item.deleted_at.is_(None))).all()
        )
        payload = [
            {
                "item_id": iid,
                "model_version": rollout.to_version,
                "vector": vectors[iid].astype("<f4").tobytes(),
            }
            for iid in held.values()
            if iid in live and iid in vectors
        ]
        if payload:  # executemany: one cached statement, batched by the driver ("insertmanyvalues")
            session.execute(
                _insert(ctx, Embedding).on_conflict_do_nothing(index_elements=["item_id", "model_version"]),
                payload,
            )
        res.embedded = [int(cast(int, p["item_id"])) for p in payload]
        res.skipped = len(held) - len(payload)
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
    images: np.ndarray | None = None  # (N, 28, 28) uint8
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
                images.append(preprocess(payload))
                prep.ids.append(int(iid))
            except InvalidImage as e:
                prep.errors[task_of[int(iid)]] = f"invalid payload: {e}"
        if images:
            prep.images = np.stack(images)
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


# --- throttle: a rollout-wide GCRA reservation in Redis, shared by every driver --------------------------
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(tat, now)
redis.call('SET', KEYS[1], string.format('%.6f', start + tonumber(ARGV[1])), 'EX', 3600)
return string.format('%.6f', start - now)
"""


def reserve(ctx: WorkerContext, rollout_id: int, n: int, rate: float) -> float:
    """Reserve `n` items of the rollout's rate budget; returns how long to wait before claiming them."""
    try:
        wait = ctx.redis.eval(_RESERVE, 1, f"backfill:throttle:{rollout_id}", f"{n / rate:.6f}")
        return float(cast(str, wait))
    except redis.RedisError as e:  # Redis gone: throttle this driver alone
        log.warning("throttle reservation failed (%s); local throttle", e)
        return n / rate


def _sleep(ctx: WorkerContext, seconds: float) -> None:
    ctx.stop.wait(max(0.0, seconds))


# --- driver ---------------------------------------------------------------------------------------------
@dataclass
class DriveSummary:
    rollout_id: int
    batches: int = 0
    embedded: list[int] = field(default_factory=list)
    failed: int = 0
    outcome: str = ""


def drive(ctx: WorkerContext, rollout_id: int, on_batch: Callable[[BatchResult], None] | None = None) -> DriveSummary:
    """The driver loop (see the module docstring). Returns when the rollout is not running, is finished,
    or the worker is stopping.

    Unthrottled, it is a two-stage pipeline: while this thread runs the encoder on batch k, one I/O thread
    commits batch k-1 and claims, loads and decodes batch k+1 (the encoder releases the GIL)."""
    summary = DriveSummary(rollout_id)
    io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"backfill-io-{rollout_id}")
    ahead: Future[Prepared] | None = None  # the prefetched next batch
    commit: Future[BatchResult] | None = None  # the previous batch's commit

    def settle() -> None:
        nonlocal commit
        if commit is not None:
            res, commit = commit.result(), None
            summary.batches += 1
            summary.embedded.extend(res.embedded)
            summary.failed += res.failed
            if on_batch is not None:
                on_batch(res)

    try:
        while not ctx.stop.is_set():
            with ctx.sessionmaker() as s:
                rollout = s.get(Rollout, rollout_id)
                if rollout is not None:
                    s.expunge(rollout)
            if rollout is None or rollout.status != "running":
                summary.outcome = "gone" if rollout is None else rollout.status
                return summary
            n = rollout.batch_size
            throttled = bool(rollout.max_items_per_second)
            if ahead is not None and throttled:  # throttle set meanwhile: give the prefetched batch back
                release(ctx, ahead.result().claimed)
                ahead = None
            if throttled:
                rate = float(rollout.max_items_per_second or 0)
                n = max(1, min(n, int(rate)))  # about one batch a second under a throttle
                wait = reserve(ctx, rollout_id, n, rate)
                if wait > 0:
                    _sleep(ctx, wait)
                    with ctx.sessionmaker() as s:
                        if s.scalar(sa.select(Rollout.status).where(Rollout.id == rollout_id)) != "running":
                            continue
            prep = ahead.result() if ahead is not None else prepare(ctx, rollout, n)
            ahead = None
            if prep.claimed.tasks:
                if not throttled:
                    ahead = io.submit(prepare, ctx, rollout, n)
                vectors = encode(ctx, rollout, prep)
                settle()
                commit = io.submit(finish, ctx, rollout, prep, vectors)
                continue
            settle()
            # Nothing claimable: finish, or wait for the leases other drivers hold to end or expire.
            with ctx.sessionmaker() as s:
                counts = domain.task_counts(s, rollout_id)
                if counts["pending"] == 0 and counts["leased"] == 0:
                    finished = domain.complete(s, ctx.settings, rollout_id, r=ctx.redis)
                    summary.outcome = finished.status if finished is not None else "finished-elsewhere"
                    return summary
                next_expiry = s.scalar(
                    sa.select(sa.func.min(BackfillTask.lease_expires_at)).where(
                        BackfillTask.rollout_id == rollout_id, BackfillTask.state == "leased"
                    )
                )
            wait = IDLE_POLL_SECONDS
            if next_expiry is not None:
                until = (domain._aware(next_expiry) - utcnow()).total_seconds() + 0.05
                wait = min(wait, max(0.05, until))
            _sleep(ctx, wait)
        summary.outcome = "stopped"
        return summary
    finally:
        settle()
        if ahead is not None:
            release(ctx, ahead.result().claimed)
        io.shutdown(wait=True)


def drive_backfill(rollout_id: int) -> dict[str, Any]:
    """RQ job: run a backfill driver for the rollout."""
    ctx = get_context()
    with _heartbeat(ctx):
        summary = drive(ctx, rollout_id)
    log.info(
        "driver for rollout %s: %d batches, %d embedded, %d failed -> %s",
        rollout_id,
        summary.batches,
        len(summary.embedded),
        summary.failed,
        summary.outcome,
    )
    return {"rollout_id": rollout_id, "embedded": len(summary.embedded), "outcome": summary.outcome}


# --- maintenance: run by every worker process on start and periodically ---------------------------------
def maintain(ctx: WorkerContext, sweep: bool = True) -> None:
    """Re-enqueue what active rollouts need (plan for `planning`, drivers for `running`; unique job ids, so
    this is idempotent) and apply the old-embedding retention."""
    with ctx.sessionmaker() as s:
        for rollout in s.scalars(sa.select(Rollout).where(Rollout.active_lock == 1)).all():
            domain.enqueue_for(ctx.redis, ctx.settings, rollout)
        if sweep:
            domain.sweep_retired_embeddings(s, ctx.settings)
