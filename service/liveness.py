"""Is anything working on a rollout? Read from Redis: the RQ workers registered on the queue (a worker's key
expires when it stops refreshing it) and the heartbeat keys of the rollout's running jobs (refreshed every
lease/3 by `worker.context.heartbeat`). `GET /rollouts/{id}`, `/readyz` and `backfill status` show it, so a
rollout with no worker says so instead of showing `planning ... eta=0s` forever.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from service import rollouts as domain
from service.config import Settings
from service.db.models import Rollout

NEEDS_WORKER = ("training", "planning", "running")


@dataclass(frozen=True)
class Liveness:
    workers: int  # RQ workers registered on the queue
    jobs_alive: int  # this rollout's jobs with a live heartbeat
    warning: str | None


def _job_ids(rollout_id: int) -> list[str]:
    slots = [domain.driver_job_id(rollout_id, n) for n in range(domain.MAX_DRIVERS)]
    return [domain.plan_job_id(rollout_id), domain.train_job_id(rollout_id), *slots]


def liveness(r: redis.Redis, settings: Settings, rollout: Rollout, remaining: int) -> Liveness:
    """Workers on the queue, live jobs of the rollout, and a warning when the rollout cannot progress."""
    from rq import Worker

    from service.redis_conn import job_queue

    workers = int(Worker.count(connection=r, queue=job_queue(r, settings)))
    keys = [domain.driver_heartbeat_key(j) for j in _job_ids(rollout.id)]
    alive = int(r.exists(*keys))  # type: ignore[arg-type]  # a sync client
    warning = None
    if rollout.status in NEEDS_WORKER and workers == 0:
        warning = (
            f"no worker is registered on queue {settings.queue_name!r}: rollout {rollout.id} will not progress "
            "until `backfill worker` runs"
        )
    elif rollout.status == "running" and remaining > 0 and alive == 0:
        warning = (
            f"no job of rollout {rollout.id} has a live heartbeat (each beats every "
            f"{settings.lease_seconds / 3:.0f}s): its worker may have stopped; a live worker re-enqueues it"
        )
    return Liveness(workers, alive, warning)


def safe_liveness(r: redis.Redis, settings: Settings, rollout: Rollout, remaining: int) -> Liveness | None:
    """`liveness`, or None when Redis cannot answer (the rollout resource still answers from the database)."""
    try:
        return liveness(r, settings, rollout, remaining)
    except redis.RedisError:
        return None
