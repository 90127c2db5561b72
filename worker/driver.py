"""The backfill driver job. A driver is a loop bound to one rollout: read the rollout (stop unless `running`),
honour the throttle, claim a batch, embed it, commit it, repeat (`worker.backfill`). Several drivers (one job
id per slot, `backfill-drive-<rollout>-<slot>`, one slot per live worker) share the work safely because:

* claims and commits are safe against each other (see `worker.backfill`);
* a SIGKILLed worker's leases simply expire and are claimed again; its driver job id is re-enqueued by any
  live worker's maintenance loop (`worker.maintenance`) once the job's heartbeat key (refreshed by a thread
  while a job runs) has expired;
* when nothing is claimable a driver waits for other drivers' leases to finish or expire, and completes the
  rollout only when no task is pending or leased (the completion re-checks under the rollout row lock).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import sqlalchemy as sa

from service import rollouts as domain
from service.db import queries
from service.db.models import BackfillTask, Rollout, utcnow
from worker.backfill import BatchResult, Prepared, encode, finish, prepare, release
from worker.context import WorkerContext, get_context, heartbeat

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.5


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
                        if queries.rollout_status(s, rollout_id) != "running":
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
            outcome = _finish_or_wait(ctx, rollout_id)
            if outcome is not None:
                summary.outcome = outcome
                return summary
        summary.outcome = "stopped"
        return summary
    finally:
        settle()
        if ahead is not None:
            release(ctx, ahead.result().claimed)
        io.shutdown(wait=True)


def _finish_or_wait(ctx: WorkerContext, rollout_id: int) -> str | None:
    """Nothing was claimable: complete the rollout when no task is pending or leased (returns the outcome),
    else wait for the leases other drivers hold to end or expire (returns None)."""
    with ctx.sessionmaker() as s:
        counts = domain.task_counts(s, rollout_id)
        if counts["pending"] == 0 and counts["leased"] == 0:
            finished = domain.complete(s, ctx.settings, rollout_id, r=ctx.redis)
            if finished is not None:
                return finished.status
            if queries.rollout_status(s, rollout_id) != "running":
                return "finished-elsewhere"
            return None  # items without a target vector were re-queued: claim them
        next_expiry = s.scalar(
            sa.select(sa.func.min(BackfillTask.lease_expires_at)).where(
                BackfillTask.rollout_id == rollout_id, BackfillTask.state == "leased"
            )
        )
    wait = IDLE_POLL_SECONDS
    if next_expiry is not None:
        until = (next_expiry - utcnow()).total_seconds() + 0.05
        wait = min(wait, max(0.05, until))
    _sleep(ctx, wait)
    return None


def drive_backfill(rollout_id: int) -> dict[str, Any]:
    """RQ job: run a backfill driver for the rollout."""
    ctx = get_context()
    with heartbeat(ctx):
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
