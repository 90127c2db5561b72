"""A worker process's context: one engine, one Redis client, the model cache, the worker's identity and stop
flag; plus the heartbeat that proves a started job alive. Jobs (`worker.plan`, `worker.driver`) build it
from the environment on first use unless the entry point (`worker.main`) or a test configured it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import redis
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
from service.redis_conn import make_redis
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


# --- threads: the encoder's torch pool leaves a core to the loader/committer threads and the database ----
TORCH_THREADS_ENV = "BACKFILL_WORKER_TORCH_THREADS"


def encoder_threads(cores: int | None = None) -> int:
    """Torch intra-op threads for a worker process: `$BACKFILL_WORKER_TORCH_THREADS` when set (> 0), else
    one less than the cores (at least one). The driver's loader and committer threads and Postgres need a
    core while the encoder runs; a torch pool over every core makes them wait for it (measured in the
    backfill bench, docs/performance.md)."""
    raw = os.environ.get(TORCH_THREADS_ENV, "").strip()
    if raw:
        try:
            if int(raw) > 0:
                return int(raw)
        except ValueError:
            pass
        log.warning("ignoring %s=%r: not a positive integer", TORCH_THREADS_ENV, raw)
    return max(1, (cores or os.cpu_count() or 1) - 1)


def apply_thread_policy() -> int:
    """Set this process's torch threads to `encoder_threads()` (a worker process calls it once at start);
    returns the count."""
    import torch

    n = encoder_threads()
    torch.set_num_threads(n)
    return n


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
