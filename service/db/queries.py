"""Every lookup that more than one module needs, written once: plain functions over a Session and plain values.

Writes and the rollout state machine live in `service.rollouts`; these only read (some with a row lock).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.db.models import CompatPack, Item, ModelVersion, Rollout


def serving_model(session: Session) -> ModelVersion | None:
    """The model version with status `serving` (at most one), or None before any is registered."""
    return session.scalars(sa.select(ModelVersion).where(ModelVersion.status == "serving")).first()


def active_rollout(session: Session) -> Rollout | None:
    """The planning|running|paused rollout (`active_lock = 1`; its unique constraint admits one)."""
    return session.scalars(sa.select(Rollout).where(Rollout.active_lock == 1)).one_or_none()


def lock_rollout(session: Session, rollout_id: int) -> Rollout | None:
    """The rollout row, locked FOR UPDATE until the transaction ends (re-read, not from the identity map)."""
    stmt = sa.select(Rollout).where(Rollout.id == rollout_id).with_for_update()
    return session.scalars(stmt.execution_options(populate_existing=True)).one_or_none()


def compat_pack(session: Session, from_version: str, to_version: str) -> CompatPack | None:
    """The compatibility pack registered for the pair (the pair is unique), or None."""
    return session.scalars(
        sa.select(CompatPack).where(CompatPack.from_version == from_version, CompatPack.to_version == to_version)
    ).first()


def model_versions(session: Session) -> list[ModelVersion]:
    """Every registered model version, oldest first."""
    return list(session.scalars(sa.select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.name)).all())


def compat_packs(session: Session) -> list[CompatPack]:
    """Every registered compatibility pack, oldest first."""
    return list(session.scalars(sa.select(CompatPack).order_by(CompatPack.id)).all())


def loadable_model_names(session: Session) -> list[str]:
    """The names of the model versions that are not retired (those a process may have to load)."""
    return list(session.scalars(sa.select(ModelVersion.name).where(ModelVersion.status != "retired")).all())


def rollout_status(session: Session, rollout_id: int, *, for_share: bool = False) -> str | None:
    """The rollout's status now, or None when it is gone. `for_share` (Postgres only) holds a shared row lock
    until the transaction ends, so an abort or completion (FOR UPDATE) cannot interleave with it."""
    stmt = sa.select(Rollout.status).where(Rollout.id == rollout_id)
    if for_share:
        stmt = stmt.with_for_update(read=True)
    return session.scalar(stmt)


def item_by_external_id(session: Session, external_id: str, *, for_update: bool = False) -> Item | None:
    """The item (live or soft-deleted) with this external id, optionally locked for update."""
    stmt = sa.select(Item).where(Item.external_id == external_id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.scalars(stmt).first()
