"""The tables of docs/design.md ("Durable state"). Portable between Postgres and SQLite (no dialect-only
column types)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so migrations and `alembic check` never depend on dialect defaults.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only autoincrements INTEGER PRIMARY KEY; BigInteger elsewhere.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")

ROLLOUT_STATES = ("planning", "running", "paused", "completed", "aborted", "failed")
ACTIVE_ROLLOUT_STATES = ("training", "planning", "running", "paused")
TASK_STATES = ("pending", "leased", "done", "failed")
MODES = ("reverse", "forward", "two-pass", "old-only")  # the query paths of models/paths.py
POLICIES = ("uncertainty", "random", "fifo")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """`DateTime(timezone=True)` that always hands back timezone-aware UTC datetimes (SQLite returns naive
    ones, Postgres ones in the session's time zone) and stores UTC. A naive datetime is refused: its zone is
    unknown. Same DDL as its `impl`, so the schema (and `alembic check`) does not change."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware one (service.db.models.utcnow())")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ModelVersion(Base):
    """An embedding model registered from the artifacts directory. Exactly one has status `serving`."""

    __tablename__ = "model_versions"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    dim: Mapped[int] = mapped_column(Integer)
    artifact_path: Mapped[str] = mapped_column(Text)
    checksum: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="registered")  # registered|serving|retired
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        CheckConstraint("status IN ('registered', 'serving', 'retired')", name="status"),
        CheckConstraint("dim > 0", name="dim_positive"),
    )


class CompatPack(Base):
    """Compatibility transformations (psi, h, sigma, calibration) for one (old, new) pair."""

    __tablename__ = "compat_packs"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    from_version: Mapped[str] = mapped_column(ForeignKey("model_versions.name"))
    to_version: Mapped[str] = mapped_column(ForeignKey("model_versions.name"))
    artifact_path: Mapped[str] = mapped_column(Text)
    checksum: Mapped[str] = mapped_column(String(128))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("from_version", "to_version"),)


class Item(Base):
    """A gallery item: its raw payload (image bytes) is kept so any future model can re-embed it."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    external_id: Mapped[str] = mapped_column(String(256), unique=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    label: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # Soft delete; `deleted_seq` orders deletes for followers the way `Embedding.seq` orders inserts.
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    deleted_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)


class Embedding(Base):
    """One item's vector in one model's space. `seq` is the monotonically increasing ingestion watermark;
    (item, version) is unique so backfill writes are idempotent upserts."""

    __tablename__ = "embeddings"

    seq: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.name"))
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian, `dim` values
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("item_id", "model_version"),
        Index("ix_embeddings_version_seq", "model_version", "seq"),
        {"sqlite_autoincrement": True},  # a deleted newest row must not give its seq to the next insert
    )


class Rollout(Base):
    """A model upgrade. Counts are derived from task states, never stored as blind increments."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    from_version: Mapped[str] = mapped_column(ForeignKey("model_versions.name"))
    to_version: Mapped[str] = mapped_column(ForeignKey("model_versions.name"))
    mode: Mapped[str] = mapped_column(String(16))
    policy: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="planning")
    batch_size: Mapped[int] = mapped_column(Integer)
    max_items_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    purge_on_abort: Mapped[bool] = mapped_column(default=False)
    # 1 while the rollout is active, NULL otherwise: the unique constraint admits one active rollout,
    # so two concurrent /upgrade calls give one 202 and one 409 (NULLs never collide).
    active_lock: Mapped[int | None] = mapped_column(Integer, nullable=True, unique=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The path: what the operator asked for (`auto` or a path), why `mode` was chosen, the pack's predicted
    # curve of that path; the live probe (item ids, old/old baseline) and the guard's last intervention.
    requested_mode: Mapped[str | None] = mapped_column(String(16), nullable=True)
    path_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    predicted: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    probe: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    guard: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The training phase (a pair without a compat pack): sample size, progress, timings; "done" once trained.
    training: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        CheckConstraint(
            "status IN ('training', 'planning', 'running', 'paused', 'completed', 'aborted', 'failed', 'rolled_back')",
            name="status",
        ),
        CheckConstraint("mode IN ('reverse', 'forward', 'two-pass', 'old-only')", name="mode"),
        CheckConstraint("policy IN ('uncertainty', 'random', 'fifo')", name="policy"),
        CheckConstraint("active_lock IS NULL OR active_lock = 1", name="active_lock"),
    )


class BackfillTask(Base):
    """One item to re-embed within a rollout. Claimed in descending priority with a lease."""

    __tablename__ = "backfill_tasks"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    priority: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    leased_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    done_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)

    __table_args__ = (
        UniqueConstraint("rollout_id", "item_id"),
        CheckConstraint("state IN ('pending', 'leased', 'done', 'failed')", name="state"),
        Index("ix_backfill_tasks_claim", "rollout_id", "state", "priority"),
    )


__all__ = [
    "ACTIVE_ROLLOUT_STATES",
    "MODES",
    "POLICIES",
    "ROLLOUT_STATES",
    "TASK_STATES",
    "BackfillTask",
    "Base",
    "CompatPack",
    "Embedding",
    "Item",
    "ModelVersion",
    "Rollout",
    "UTCDateTime",
    "func",
    "utcnow",
]
