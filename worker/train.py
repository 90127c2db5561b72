"""The training phase of a rollout whose pair has no compat pack: learn one from the live gallery.

`train_rollout` (an RQ job, re-run safely after a crash):
1. picks a sample of live items that have an old-model vector (`BACKFILL_TRAIN_SAMPLE`, seeded by the rollout
   id) and embeds those without a target vector with the target model, batch by batch, committing each batch
   like a backfill (`ON CONFLICT DO NOTHING`): real progress, those items stay backfilled and their plan
   tasks start `done`; the rollout's `training` field counts them;
2. trains psi, h, sigma and the calibrations on the (stored old vector, new vector) pairs, label-free unless
   every sampled item has a label (models/gallery_fit.py), and predicts every path's curve on the held-out
   part;
3. writes the pack under the artifacts folder (written aside, then renamed into place) and registers it;
4. if the rollout is still `training`: chooses its path from the predictions (service/paths.py) and moves it
   to `planning`, then enqueues the plan job.

A pause or abort between batches stops the job; a resume re-enqueues it and it continues where the
embeddings stand. While `training`, the rollout serves the `old-only` path: search answers exactly as before.
`fit_gallery_pack` is the same work without a rollout (`backfill train gallery`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.artifacts import save_compat
from models.gallery_fit import GalleryFitConfig, fit_on_sample
from models.preprocess import InvalidImage, decode
from service import events, paths
from service import rollouts as domain
from service.db import queries
from service.db.models import Embedding, Item, ModelVersion, Rollout, utcnow
from service.errors import Conflict
from service.registry import register_pack
from worker.context import WorkerContext, get_context, heartbeat

log = logging.getLogger(__name__)

EMBED_BATCH = 256


def sample_items(session: Session, from_version: str, size: int, seed: int) -> np.ndarray:
    """Up to `size` live item ids with an old-model vector, drawn without replacement (seeded), sorted."""
    ids = np.array(
        session.scalars(
            sa.select(Embedding.item_id)
            .join(Item, Item.id == Embedding.item_id)
            .where(Embedding.model_version == from_version, Item.deleted_at.is_(None))
            .order_by(Embedding.item_id)
        ).all(),
        dtype=np.int64,
    )
    if len(ids) <= size:
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, size=size, replace=False))


def _missing(session: Session, to_version: str, ids: np.ndarray) -> list[int]:
    have = set(
        session.scalars(
            sa.select(Embedding.item_id).where(
                Embedding.model_version == to_version, Embedding.item_id.in_(ids.tolist())
            )
        ).all()
    )
    return [int(i) for i in ids if int(i) not in have]


def embed_sample(
    ctx: WorkerContext, from_to: tuple[str, str], ids: np.ndarray, keep_going: Any = lambda done, total: True
) -> int:
    """Embed the sample items that lack a target vector, one committed batch at a time; returns how many were
    written. `keep_going(items of the sample with a target vector, sample size)` runs before every batch (it records the
    progress); the embedding stops when it returns false."""
    to_version = from_to[1]
    written = 0
    with ctx.sessionmaker() as s:
        todo = _missing(s, to_version, ids)
        target = s.get(ModelVersion, to_version)
        if target is None:
            raise RuntimeError(f"model {to_version} vanished")
        encoder = ctx.encoder(target)
    for k in range(0, len(todo), EMBED_BATCH):
        if not keep_going(len(ids) - len(todo) + written, len(ids)):
            break
        with ctx.sessionmaker() as s:
            rows = s.execute(
                sa.select(Item.id, Item.payload).where(
                    Item.id.in_(todo[k : k + EMBED_BATCH]), Item.deleted_at.is_(None)
                )
            ).all()
            images, item_ids = [], []
            for iid, payload in rows:
                try:
                    images.append(decode(payload))
                    item_ids.append(int(iid))
                except InvalidImage as e:
                    log.warning("training sample: item %s has an invalid payload (%s); skipped", iid, e)
            if not images:
                continue
            vecs = encoder.embed(images)
            values = [
                {"item_id": i, "model_version": to_version, "vector": v.astype("<f4").tobytes()}
                for i, v in zip(item_ids, vecs, strict=True)
            ]
            s.execute(ctx.insert(Embedding).values(values).on_conflict_do_nothing())
            s.commit()
        written += len(values)
        events.publish(ctx.redis, events.EMBEDDINGS, count=len(values))
    return written


def load_pairs(
    session: Session, from_to: tuple[str, str], ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(old vectors, new vectors, labels with -1 for none) of the sample items that have both vectors."""
    src, dst = from_to
    vec: dict[str, dict[int, bytes]] = {src: {}, dst: {}}
    rows = session.execute(
        sa.select(Embedding.item_id, Embedding.model_version, Embedding.vector).where(
            Embedding.item_id.in_(ids.tolist()), Embedding.model_version.in_([src, dst])
        )
    )
    for iid, version, blob in rows:
        vec[version][int(iid)] = blob
    both = sorted(set(vec[src]) & set(vec[dst]))
    label_of = dict(session.execute(sa.select(Item.id, Item.label).where(Item.id.in_(both))).tuples().all())
    old = np.stack([np.frombuffer(vec[src][i], dtype="<f4") for i in both]) if both else np.zeros((0, 1), np.float32)
    new = np.stack([np.frombuffer(vec[dst][i], dtype="<f4") for i in both]) if both else np.zeros((0, 1), np.float32)
    labels = np.array([-1 if label_of.get(i) is None else label_of[i] for i in both], dtype=np.int64)
    return old, new, labels


def write_pack(ctx: WorkerContext, from_to: tuple[str, str], fitted: Any, sample: int) -> Path:
    """Save the fitted pack as `compat-<from>-<to>` under the artifacts folder (aside first, then renamed)."""
    src, dst = from_to
    final = Path(ctx.settings.artifacts_dir) / f"compat-{src}-{dst}"
    aside = final.with_name(f".{final.name}.partial")
    shutil.rmtree(aside, ignore_errors=True)
    with ctx.sessionmaker() as s:
        dims = dict(s.execute(sa.select(ModelVersion.name, ModelVersion.dim)).tuples().all())
    manifest = {
        "from": src,
        "to": dst,
        "from_dim": int(dims[src]),
        "to_dim": int(dims[dst]),
        "name": final.name,
        "config": fitted.config,
        "calibration": fitted.calibration,
        "predictions": fitted.predictions,
        "data": {"source": "live gallery", "sample": sample, "trained_at": utcnow().isoformat()},
        "metrics": fitted.metrics,
    }
    save_compat(fitted.psi, fitted.h, fitted.sigma, aside, manifest)
    if final.exists():
        shutil.rmtree(final)
    aside.rename(final)
    return final


def fit_gallery_pack(
    ctx: WorkerContext, from_to: tuple[str, str], seed: int, keep_going: Any = lambda done, total: True
) -> tuple[Path | None, dict[str, Any]]:
    """Sample, embed, fit and write a pack for the pair; (None, info) when stopped before the fit."""
    t0 = time.monotonic()
    settings = ctx.settings
    with ctx.sessionmaker() as s:
        ids = sample_items(s, from_to[0], settings.train_sample, seed)
    embedded = embed_sample(ctx, from_to, ids, keep_going)
    info: dict[str, Any] = {"sample": len(ids), "embedded": embedded, "embed_seconds": round(time.monotonic() - t0, 1)}
    if not keep_going(len(ids), len(ids)):
        return None, info
    with ctx.sessionmaker() as s:
        old, new, labels = load_pairs(s, from_to, ids)
    cfg = GalleryFitConfig(probe_share=settings.train_probe_share, min_steps=settings.train_steps, seed=seed)
    fitted = fit_on_sample(old, new, labels, cfg)
    path = write_pack(ctx, from_to, fitted, len(ids))
    info.update(fit_seconds=fitted.metrics["seconds"], seconds=round(time.monotonic() - t0, 1))
    return path, info


def _progress(ctx: WorkerContext, rollout_id: int, done: int, sample: int) -> bool:
    """Record how many sample items have a target vector; True while the rollout is still `training`."""
    with ctx.sessionmaker() as s:
        rollout = s.get(Rollout, rollout_id)
        if rollout is None:
            return False
        rollout.training = {**(rollout.training or {}), "sample_done": done, "sample": sample}
        s.commit()
        return rollout.status == "training"


def train_rollout(rollout_id: int) -> dict[str, Any]:
    """The job: train the pair's pack on the gallery unless it exists, then move the rollout to planning."""
    ctx = get_context()
    with heartbeat(ctx), ctx.sessionmaker() as s:
        rollout = s.get(Rollout, rollout_id)
        if rollout is None or rollout.status != "training":
            return {"rollout_id": rollout_id, "trained": False}
        from_to = (rollout.from_version, rollout.to_version)
        info: dict[str, Any] = dict(rollout.training or {})
        has_pack = queries.compat_pack(s, *from_to) is not None
        s.rollback()  # no transaction stays open (holding back the ingestion horizon) through the training
        if not has_pack:
            path, fit_info = fit_gallery_pack(
                ctx, from_to, rollout_id, lambda done, total: _progress(ctx, rollout_id, done, total)
            )
            info.update(fit_info)
            if path is None:
                _save_info(s, rollout_id, info)
                return {"rollout_id": rollout_id, "trained": False}
            register_pack(s, *from_to, path)
            s.commit()
        started = finish_training(s, ctx, rollout_id, info)
        return {"rollout_id": rollout_id, "trained": True, "planning": started}


def _save_info(session: Session, rollout_id: int, info: dict[str, Any]) -> None:
    session.execute(sa.update(Rollout).where(Rollout.id == rollout_id).values(training=info))
    session.commit()


def finish_training(session: Session, ctx: WorkerContext, rollout_id: int, info: dict[str, Any]) -> bool:
    """Choose the path from the new pack's predictions and move a still-`training` rollout to planning."""
    rollout = queries.lock_rollout(session, rollout_id)
    if rollout is None or rollout.status != "training":
        session.rollback()
        return False
    requested = rollout.requested_mode or "auto"
    src, dst = rollout.from_version, rollout.to_version
    try:
        choice = paths.choose_path(session, ctx.settings, src, dst, requested, rollout.policy, False)
    except Conflict as e:  # an explicit path the new pack predicts to dip: auto instead, and say so
        choice = paths.choose_path(session, ctx.settings, src, dst, "auto", rollout.policy, False)
        choice = replace(choice, reason=f"{choice.reason} (requested {requested}: {e})")
    paths.apply_choice(rollout, choice, requested)
    rollout.status = "planning"
    rollout.training = {**info, "done": True, "finished_at": utcnow().isoformat()}
    session.commit()
    events.publish(ctx.redis, events.ROLLOUT, rollout_id=rollout_id, status="planning", mode=rollout.mode)
    domain.enqueue_plan(ctx.redis, ctx.settings, rollout_id)
    log.info("rollout %s trained its pack (%s); path %s", rollout_id, info, choice.reason)
    return True
