"""Durable state: SQLAlchemy models and session factories. Postgres (or embedded SQLite) is the only source
of truth; FAISS indices and Redis queues are derived from it."""

from service.db.models import (
    ACTIVE_ROLLOUT_STATES,
    BackfillTask,
    Base,
    CompatPack,
    Embedding,
    Item,
    ModelVersion,
    Rollout,
)
from service.db.session import make_engine, make_sessionmaker

__all__ = [
    "ACTIVE_ROLLOUT_STATES",
    "BackfillTask",
    "Base",
    "CompatPack",
    "Embedding",
    "Item",
    "ModelVersion",
    "Rollout",
    "make_engine",
    "make_sessionmaker",
]
