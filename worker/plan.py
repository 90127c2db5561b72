"""The plan job: one backfill task per live item, prioritised by the rollout's policy; then the rollout runs
and its drivers are enqueued (`worker.driver`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import events
from service import rollouts as domain
from service.db import queries
from service.db.models import BackfillTask, Embedding, Item, Rollout, utcnow
from service.probe import plan_probe
from worker.context import WorkerContext, get_context, heartbeat

log = logging.getLogger(__name__)

NO_V1_PRIORITY = 1e30  # items without an old vector are searchable nowhere: backfill them first
INSERT_CHUNK = 5000


def compute_priorities(session: Session, ctx: WorkerContext, rollout: Rollout, item_ids: np.ndarray) -> np.ndarray:
    """Priority per item (higher = earlier) from the rollout's policy."""
    if rollout.policy == "fifo":
        return -item_ids.astype(np.float64)
    if rollout.policy == "random":
        return np.random.default_rng(rollout.id).random(len(item_ids))
    # uncertainty: sigma of the compat pack over the stored old vectors; no new-model pass needed.
    pack_row = queries.compat_pack(session, rollout.from_version, rollout.to_version)
    if pack_row is None:
        raise RuntimeError(f"no compat pack {rollout.from_version} -> {rollout.to_version} is registered")
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
    with heartbeat(ctx), ctx.sessionmaker() as s:
        rollout = s.get(Rollout, rollout_id)
        if rollout is None:
            log.warning("plan: rollout %s vanished", rollout_id)
            return {"rollout_id": rollout_id, "planned": 0}
        training = rollout.training is not None and not rollout.training.get("done")
        if rollout.started_at is not None or rollout.status not in ("planning", "paused") or training:
            if rollout.status == "running":
                domain.enqueue_drivers(ctx.redis, ctx.settings, rollout_id)
            return {"rollout_id": rollout_id, "planned": 0}
        t0 = time.perf_counter()
        item_ids = np.array(
            s.scalars(sa.select(Item.id).where(Item.deleted_at.is_(None)).order_by(Item.id)).all(),
            dtype=np.int64,
        )
        already = np.array(
            s.scalars(sa.select(Embedding.item_id).where(Embedding.model_version == rollout.to_version)).all(),
            dtype=np.int64,
        )
        priorities = compute_priorities(s, ctx, rollout, item_ids) if len(item_ids) else np.zeros(0)
        probe = rollout.probe if rollout.probe is not None else plan_probe(s, rollout, ctx.settings)
        # Items that already have a target vector (added during the rollout) need no pass.
        done = np.isin(item_ids, already)
        # Rows are built one chunk at a time: the whole plan is three arrays of 8 bytes an item, not a dict each.
        for k in range(0, len(item_ids), INSERT_CHUNK):
            rows = [
                {
                    "rollout_id": rollout_id,
                    "item_id": int(i),
                    "priority": float(p),
                    "state": "done" if d else "pending",
                    "attempts": 0,
                }
                for i, p, d in zip(
                    item_ids[k : k + INSERT_CHUNK],
                    priorities[k : k + INSERT_CHUNK],
                    done[k : k + INSERT_CHUNK],
                    strict=True,
                )
            ]
            s.execute(ctx.insert(BackfillTask).values(rows).on_conflict_do_nothing())
        now = utcnow()
        s.execute(
            sa.update(Rollout)
            .where(Rollout.id == rollout_id)
            .values(
                started_at=now,
                updated_at=now,
                probe=probe,
                status=sa.case((Rollout.status == "planning", "running"), else_=Rollout.status),
            )
        )
        s.commit()
        rollout = domain.get_rollout(s, rollout_id)
        log.info(
            "planned rollout %s: %d tasks (%s) in %.2fs",
            rollout_id,
            len(item_ids),
            rollout.policy,
            time.perf_counter() - t0,
        )
        events.publish(ctx.redis, events.ROLLOUT, rollout_id=rollout_id, status=rollout.status)
        if rollout.status == "running":
            domain.enqueue_drivers(ctx.redis, ctx.settings, rollout_id)
        return {"rollout_id": rollout_id, "planned": len(item_ids)}
