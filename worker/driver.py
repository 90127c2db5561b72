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

import numpy as np
import redis
import sqlalchemy as sa

from service import rollouts as domain
from service.db import queries
from service.db.models import BackfillTask, Rollout, utcnow
from worker.backfill import BatchResult, release
from worker.context import ThreadPolicy, WorkerContext, get_context, heartbeat
from worker.pipeline import Loaded, encode_loaded, finish_loaded, load_batch
from worker.stages import timed

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


class _Pipeline:
    """The driver's two helper threads: `loader` claims, loads, decodes and fits the next batch and
    `committer` commits the previous one, while the driver's own thread runs the encoder (which releases the
    GIL). At most one batch is prefetched and one commit in flight; an exception in either thread is raised
    in the driver's thread when it takes that batch or settles that commit."""

    def __init__(self, ctx: WorkerContext, summary: DriveSummary, on_batch: Callable[[BatchResult], None] | None):
        rid = summary.rollout_id
        self.ctx, self.summary, self.on_batch = ctx, summary, on_batch
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"backfill-load-{rid}")
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"backfill-commit-{rid}")
        self.ahead: Future[Loaded] | None = None  # the prefetched next batch
        self.commit: Future[BatchResult] | None = None  # the previous batch's commit

    def take(self, rollout: Rollout, n: int) -> Loaded:
        """The prefetched batch, else one claimed now on this thread."""
        ahead, self.ahead = self.ahead, None
        return ahead.result() if ahead is not None else load_batch(self.ctx, rollout, n)

    def prefetch(self, rollout: Rollout, n: int) -> None:
        self.ahead = self.loader.submit(load_batch, self.ctx, rollout, n)

    def give_back(self) -> None:
        """Release the prefetched batch (the throttle was set, or the driver stops)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            release(self.ctx, ahead.result().claimed)

    def settle(self) -> None:
        """Wait for the previous commit and count it."""
        commit, self.commit = self.commit, None
        if commit is not None:
            res = commit.result()
            self.summary.batches += 1
            self.summary.embedded.extend(res.embedded)
            self.summary.failed += res.failed
            if self.on_batch is not None:
                self.on_batch(res)

    def submit_commit(self, rollout: Rollout, prep: Loaded, vectors: dict[int, np.ndarray]) -> None:
        """Commit `prep` on the committer thread once the previous commit is settled; if that one failed,
        `prep` is given back (it will not be committed) and the error raised."""
        try:
            self.settle()
        except BaseException:
            _release_quietly(self.ctx, prep)
            raise
        self.commit = self.committer.submit(finish_loaded, self.ctx, rollout, prep, vectors)

    def close(self) -> None:
        """Settle the last commit and give back the prefetched batch, whatever fails, then stop the threads.
        The first error is raised (a failed prefetch claimed nothing; its leases, if any, expire)."""
        try:
            self.settle()
        finally:
            try:
                self.give_back()
            finally:
                self.loader.shutdown(wait=True)
                self.committer.shutdown(wait=True)


def _release_quietly(ctx: WorkerContext, prep: Loaded) -> None:
    """Give a batch back while another error propagates; if that fails too its leases simply expire."""
    try:
        release(ctx, prep.claimed)
    except Exception:
        log.exception("giving back %d tasks failed; their leases will expire", len(prep.claimed.tasks))


def drive(ctx: WorkerContext, rollout_id: int, on_batch: Callable[[BatchResult], None] | None = None) -> DriveSummary:
    """The driver loop (see the module docstring). Returns when the rollout is not running, is finished,
    or the worker is stopping.

    Unthrottled, it is a three-stage pipeline (`_Pipeline`, `worker.pipeline`): while this thread runs the
    encoder on batch k, the loader thread claims, loads and decodes batch k+1 and the committer thread
    commits batch k-1. Throttled, it claims one batch at a time on this thread."""
    summary = DriveSummary(rollout_id)
    pipe = _Pipeline(ctx, summary, on_batch)
    error: BaseException | None = None
    try:
        while not ctx.stop.is_set():
            with ctx.sessionmaker() as s, timed(ctx.stages, "rollout"):
                rollout = s.get(Rollout, rollout_id)
                if rollout is not None:
                    s.expunge(rollout)
            if rollout is None or rollout.status != "running":
                summary.outcome = "gone" if rollout is None else rollout.status
                return summary
            n = rollout.batch_size
            throttled = bool(rollout.max_items_per_second)
            if throttled:
                pipe.give_back()  # a throttle set meanwhile: give the prefetched batch back
                rate = float(rollout.max_items_per_second or 0)
                n = max(1, min(n, int(rate)))  # about one batch a second under a throttle
                wait = reserve(ctx, rollout_id, n, rate)
                if wait > 0:
                    _sleep(ctx, wait)
                    with ctx.sessionmaker() as s:
                        if queries.rollout_status(s, rollout_id) != "running":
                            continue
            prep = pipe.take(rollout, n)
            if prep.claimed.tasks:
                if not throttled:
                    pipe.prefetch(rollout, n)
                pipe.submit_commit(rollout, prep, encode_loaded(ctx, rollout, prep))
                continue
            pipe.settle()
            outcome = _finish_or_wait(ctx, rollout_id)
            if outcome is not None:
                summary.outcome = outcome
                return summary
        summary.outcome = "stopped"
        return summary
    except BaseException as e:
        error = e
        raise
    finally:
        _close(pipe, error)


def _close(pipe: _Pipeline, error: BaseException | None) -> None:
    """`pipe.close()`; while an error is already propagating, a second one is logged, not raised over it."""
    try:
        pipe.close()
    except Exception:
        if error is None:
            raise
        log.exception("closing the backfill pipeline after %r failed too", error)


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
    threads = ThreadPolicy(ctx)  # this host's cores shared among its workers, re-counted while it runs
    threads.tick()
    with heartbeat(ctx):
        summary = drive(ctx, rollout_id, on_batch=threads.tick)
    log.info(
        "driver for rollout %s: %d batches, %d embedded, %d failed -> %s",
        rollout_id,
        summary.batches,
        len(summary.embedded),
        summary.failed,
        summary.outcome,
    )
    return {"rollout_id": rollout_id, "embedded": len(summary.embedded), "outcome": summary.outcome}
