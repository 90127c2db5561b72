"""The FastAPI application factory and its lifespan (typed state on `app.state.runtime`)."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from service.api import docs, errors, failures, items, models, openapi, rollouts, search, system
from service.api.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.api.startup import interruptible_startup
from service.config import Settings, get_settings
from service.runtime import Runtime

log = logging.getLogger(__name__)

STARTUP_READY_TIMEOUT_SECONDS = 60.0


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    with interruptible_startup():  # SIGTERM while this blocks (database down, index build) stops the process
        runtime = Runtime.create(settings)
        try:
            await run_in_threadpool(runtime.start)
        except BaseException:
            runtime.stop()
            raise
        app.state.runtime = runtime
        # Accept connections only once the indices are built (bounded): a restarted process that listened at
        # once would answer /search with 503 "indices are still loading" until its first rebuild finished.
        if not await run_in_threadpool(runtime.wait_ready, STARTUP_READY_TIMEOUT_SECONDS):
            log.warning(
                "indices not built after %.0fs; serving anyway (/readyz says 503)", STARTUP_READY_TIMEOUT_SECONDS
            )
    freeze_startup_heap()
    try:
        yield
    finally:
        gc.unfreeze()
        await run_in_threadpool(runtime.stop)


def freeze_startup_heap() -> None:
    """Move everything start-up left alive (modules, models, the first indices: ~300,000 objects) out of the
    cyclic collector's reach, so that a full (generation-2) collection walks only what serving allocates.
    Without it each full collection walked the whole start-up heap and stalled every request in flight for
    150-380 ms, every few seconds under load (docs/performance.md, "Concurrent /search: micro-batching").
    Garbage is collected first so that none is frozen. Frozen objects are still freed by reference counting,
    which is how a swapped-out `IndexSet` (no reference cycles) goes; only cyclic garbage made of frozen
    objects would wait for `gc.unfreeze()` at shutdown. Later rebuilds are not frozen: they add few tracked
    objects (the vectors are numpy/FAISS memory, which the collector does not walk)."""
    gc.collect()
    gc.freeze()
    log.info("froze %d start-up objects out of the cyclic GC", gc.get_freeze_count())


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings` defaults to the process's environment."""
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level)
    app = FastAPI(
        title="online-backfill",
        summary="Nearest-neighbour search that upgrades its embedding model without downtime.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by service.api.docs with local assets (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.runtime = None
    errors.install(app)
    docs.install(app)
    openapi.install(app, settings)
    app.include_router(system.router)
    app.include_router(models.router)
    app.include_router(search.router)
    app.include_router(items.router)
    app.include_router(rollouts.router)
    app.include_router(failures.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)  # added last = outermost: 413s are counted too
    return app
