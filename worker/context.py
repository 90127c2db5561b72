"""A worker process's context: one engine, one Redis client, the model cache, the worker's identity and stop
flag; plus the heartbeat that proves a started job alive. Jobs (`worker.plan`, `worker.driver`) build it
from the environment on first use unless the entry point (`worker.main`) or a test configured it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rq import Worker
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from models.artifacts import CompatPack, Encoder, pick_device
from service import metrics
from service import rollouts as domain
from service.config import Settings, get_settings
from service.db import make_engine, make_sessionmaker
from service.db.models import CompatPack as CompatPackRow
from service.db.models import ModelVersion
from service.model_cache import EncoderRef, ModelCache, PackRef
from service.redis_conn import JOB_SERIALIZER, job_queue, make_redis
from worker.stages import StageClock

log = logging.getLogger(__name__)


def _export_model_series(model: str) -> None:
    """Export a model's series at zero before its first batch, so rate() sees the first increase (a series
    born at its final value has no rate)."""
    metrics.WORKER_ITEMS_TOTAL.labels(model=model)
    metrics.WORKER_FAILURES_TOTAL.labels(model=model)
    metrics.WORKER_BATCH_SECONDS.labels(model=model)


# --- per-process context: one engine, one Redis client, models loaded once ------------------------------
@dataclass
class WorkerContext:
    settings: Settings
    sessionmaker: sessionmaker[Session]
    redis: redis.Redis
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    stop: threading.Event = field(default_factory=threading.Event)
    models: ModelCache = field(init=False)
    stages: StageClock | None = None  # per-stage timings (the backfill bench sets one; see worker.stages)
    _device: str | None = None

    def __post_init__(self) -> None:
        self.models = ModelCache(self.settings.artifacts_dir, lambda: self.device, _export_model_series)

    @property
    def is_postgres(self) -> bool:
        return not self.settings.is_sqlite

    @property
    def device(self) -> str:
        # Resolved lazily, on first use inside a job: CUDA is never initialised before a fork.
        if self._device is None:
            self._device = pick_device(self.settings.use_gpu)
        return self._device

    def encoder(self, mv: ModelVersion) -> Encoder:
        return self.models.encoder(EncoderRef.of(mv))

    def compat(self, row: CompatPackRow) -> CompatPack:
        return self.models.compat(PackRef.of(row))

    def insert(self, model: Any) -> Any:
        """The dialect's INSERT (for `on_conflict_do_nothing`)."""
        return postgresql.insert(model) if self.is_postgres else sqlite.insert(model)


# --- threads: the worker processes of one host share its cores ----------------------------------------
TORCH_THREADS_ENV = "BACKFILL_WORKER_TORCH_THREADS"
THREAD_POLICY_SECONDS = 30.0  # how often a running driver re-counts the workers on its host


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def encoder_threads(cores: int | None = None, workers: int = 1) -> int:
    """Torch intra-op threads for a worker process: `$BACKFILL_WORKER_TORCH_THREADS` when set (> 0), else an
    equal share of the cores among the `workers` worker processes of this host (at least one). The loader
    and committer threads and Postgres mostly wait on each other and fit beside a full torch pool (with
    OMP_WAIT_POLICY=PASSIVE, set by the `worker` package): one worker on two quiet cores embeds 1.04x to
    1.44x as much with two torch threads as with one (median 1.25x, nine rounds; docs/performance.md); two
    workers on one host get one each rather than four threads on two cores."""
    raw = os.environ.get(TORCH_THREADS_ENV, "").strip()
    if raw:
        try:
            if int(raw) > 0:
                return int(raw)
        except ValueError:
            pass
        log.warning("ignoring %s=%r: not a positive integer", TORCH_THREADS_ENV, raw)
    return max(1, (cores or host_cores()) // max(1, workers))


def apply_thread_policy(workers: int = 1) -> int:
    """Set this process's torch threads to `encoder_threads(workers=workers)`; returns the count."""
    import torch

    n = encoder_threads(workers=workers)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


HOST_FIELD = "backfill_host"  # this project's field in an RQ worker's hash: the host it runs on (`host_id`)


def host_id() -> str:
    """What identifies the machine: the kernel's boot id, which every container on one host shares (their
    hostnames differ), else the hostname."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


def workers_on_host(ctx: WorkerContext) -> int:
    """Live RQ workers of the backfill queue whose hash names this host (`worker.main.BackfillWorker` records
    it at registration); 1 when Redis fails."""
    host = host_id()
    try:
        found = Worker.all(connection=ctx.redis, queue=job_queue(ctx.redis, ctx.settings), serializer=JOB_SERIALIZER)
        pipe = ctx.redis.pipeline(transaction=False)
        for w in found:
            pipe.hget(w.key, HOST_FIELD)
        hosts = pipe.execute()
    except redis.RedisError as e:
        log.warning("counting this host's workers failed (%s): assuming one", e)
        return 1
    return sum(1 for h in hosts if h is not None and (h.decode() if isinstance(h, bytes) else h) == host)


class ThreadPolicy:
    """A running driver's torch threads, re-applied from the count of this host's workers at most every
    `THREAD_POLICY_SECONDS` (workers start and stop while a rollout runs). Call `tick` from the thread that
    runs the encoder (`torch.set_num_threads` applies to the calling thread's OpenMP pool)."""

    def __init__(self, ctx: WorkerContext, interval: float = THREAD_POLICY_SECONDS) -> None:
        self.ctx, self.interval = ctx, interval
        self.checked = -float("inf")
        self.threads = 0

    def tick(self, *_: object) -> None:
        """Re-count and re-apply when the interval has passed (takes and ignores a driver's batch result)."""
        now = time.monotonic()
        if now - self.checked >= self.interval:
            self.checked = now
            n = apply_thread_policy(max(1, workers_on_host(self.ctx)))
            if n != self.threads:
                log.info("encoder threads: %d", n)
                self.threads = n


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
def heartbeat(ctx: WorkerContext) -> Iterator[None]:
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
