"""Maintenance, run by every worker process on start and periodically (`worker.main`): re-enqueue what the
active rollout needs, which is how a SIGKILLed worker's driver is replaced, and apply the old-embedding
retention."""

from __future__ import annotations

from service import rollouts as domain
from service.db import queries
from worker.context import WorkerContext


def maintain(ctx: WorkerContext, sweep: bool = True) -> None:
    """Re-enqueue what active rollouts need (plan for `planning`, drivers for `running`; unique job ids, so
    this is idempotent) and apply the old-embedding retention."""
    with ctx.sessionmaker() as s:
        rollout = queries.active_rollout(s)
        if rollout is not None:
            domain.enqueue_for(ctx.redis, ctx.settings, rollout)
        if sweep:
            domain.sweep_retired_embeddings(s, ctx.settings)
