"""The worker process: an RQ worker that runs jobs in its own process (no fork per job), so the models it
loads stay cached across jobs and CUDA is initialised at most once, in this process, after any fork.

On start and then every `maintenance_seconds` a thread re-enqueues what active rollouts need (unique job
ids, so concurrent workers never double the work) and applies the old-embedding retention; this is how a
SIGKILLed worker's driver is replaced.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from rq import SimpleWorker

from service.config import Settings
from service.redis_conn import JOB_SERIALIZER, job_queue
from worker.context import HOST_FIELD, WorkerContext, apply_thread_policy, configure, host_id, workers_on_host
from worker.maintenance import maintain

log = logging.getLogger(__name__)


class BackfillWorker(SimpleWorker):
    """SimpleWorker whose warm shutdown (SIGTERM/SIGINT) also tells a running driver to stop after its
    current batch: drivers otherwise run until their rollout finishes."""

    backfill_context: WorkerContext | None = None

    def register_birth(self) -> None:
        """RQ's registration, plus the host it runs on (`worker.context.workers_on_host` counts them)."""
        super().register_birth()
        self.connection.hset(self.key, HOST_FIELD, host_id())

    def handle_warm_shutdown_request(self) -> None:
        if self.backfill_context is not None:
            self.backfill_context.stop.set()
        super().handle_warm_shutdown_request()


class Maintenance(threading.Thread):
    def __init__(self, ctx: WorkerContext, interval: float) -> None:
        super().__init__(name="backfill-maintenance", daemon=True)
        self.ctx = ctx
        self.interval = interval

    def run(self) -> None:
        while not self.ctx.stop.wait(self.interval):
            try:
                maintain(self.ctx)
            except Exception:  # keep the loop alive across DB/Redis hiccups
                log.exception("maintenance failed")


def build_worker(ctx: WorkerContext, name: str | None = None) -> BackfillWorker:
    """The RQ worker on the backfill queue: JSON jobs only (a pickled payload is refused, never loaded)."""
    kwargs: dict[str, Any] = {"connection": ctx.redis, "serializer": JOB_SERIALIZER}
    if name:
        kwargs["name"] = name
    worker = BackfillWorker([job_queue(ctx.redis, ctx.settings)], **kwargs)
    worker.backfill_context = ctx
    return worker


def run_worker(
    settings: Settings,
    *,
    burst: bool = False,
    name: str | None = None,
    maintenance_seconds: float = 10.0,
    metrics_port: int | None = None,
) -> None:
    """Run a backfill worker until stopped (or, with `burst`, until the queue is empty)."""
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    port = settings.metrics_port if metrics_port is None else metrics_port
    if port > 0:
        from prometheus_client import start_http_server

        start_http_server(port, addr=settings.metrics_bind)
        log.info("worker metrics on %s:%d/metrics", settings.metrics_bind, port)
    ctx = configure(settings)
    log.info("encoder threads: %d", apply_thread_policy(workers_on_host(ctx) + 1))  # + this one, not yet registered
    worker = build_worker(ctx, name)
    maintain(ctx)
    if not burst:
        Maintenance(ctx, maintenance_seconds).start()
    try:
        worker.work(burst=burst, logging_level=settings.log_level, with_scheduler=False)
    finally:
        ctx.stop.set()
