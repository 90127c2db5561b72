"""Gallery writes and reads as plain functions (no HTTP): add items, read one, soft-delete one.

Adding stores the original image bytes and the embedding(s) in one transaction: the serving model's
outside a rollout; during a rollout from -> to, BOTH (the `to` vector puts the item in NEW at once, the
`from` vector means an abort loses nothing). Idempotent on the external id: a live item is left as it is;
a deleted one is revived with fresh embedding rows (new seqs, so every follower sees them).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from models.artifacts import Encoder
from service.db import queries
from service.db.models import Embedding, Item, utcnow
from service.errors import NotFound, NotReady
from service.ingest import read_layout


class EncoderSource(Protocol):
    def encoder(self, name: str) -> Encoder: ...


@dataclass(frozen=True)
class NewItem:
    external_id: str
    payload: bytes  # the original image bytes, as sent
    image: np.ndarray  # decoded uint8 (H, W) or (H, W, 3); each model fits it to its input spec
    label: int | None = None


@dataclass(frozen=True)
class AddResult:
    created: list[str]
    existing: list[str]
    revived: list[str]
    models: list[str]
    max_seq: int


@dataclass(frozen=True)
class ItemInfo:
    """One live item as read back: its ids, label, timestamps, size and embedding models."""

    item_id: int  # internal (the index key)
    external_id: str
    label: int | None
    created_at: dt.datetime
    updated_at: dt.datetime
    payload_bytes: int
    embeddings: list[str]


def write_models(session: Session) -> list[str]:
    """Models a new item must be embedded with now (docs/rollout-semantics.md)."""
    layout = read_layout(session)
    if layout.serving is None:
        raise NotReady("model", "no model is serving; register artifacts first")
    if layout.in_rollout:
        return [str(layout.to_model), str(layout.from_model)]
    return [layout.serving]


def add_items(session: Session, encoders: EncoderSource, items: list[NewItem]) -> AddResult:
    """Insert items and their embeddings in one transaction (retried once on a concurrent insert)."""
    try:
        return _add_items(session, encoders, items)
    except IntegrityError:
        session.rollback()
        return _add_items(session, encoders, items)


def _add_items(session: Session, encoders: EncoderSource, items: list[NewItem]) -> AddResult:
    seen: dict[str, NewItem] = {}
    for it in items:  # the last occurrence of a repeated id wins within one request
        seen[it.external_id] = it
    rows = {r.external_id: r for r in session.scalars(sa.select(Item).where(Item.external_id.in_(list(seen)))).all()}
    models = write_models(session)
    created: list[str] = []
    existing: list[str] = []
    revived: list[str] = []
    todo: list[tuple[Item, NewItem]] = []
    for ext, it in seen.items():
        row = rows.get(ext)
        if row is not None and row.deleted_at is None:
            existing.append(ext)
            continue
        if row is None:
            row = Item(external_id=ext, payload=it.payload, label=it.label)
            session.add(row)
            created.append(ext)
        else:
            session.execute(sa.delete(Embedding).where(Embedding.item_id == row.id))
            row.payload, row.label = it.payload, it.label
            row.deleted_at, row.deleted_seq = None, None
            row.updated_at = utcnow()
            revived.append(ext)
        todo.append((row, it))
    max_seq = 0
    if todo:
        session.flush()  # item ids
        images = [it.image for _, it in todo]
        embeddings = []
        for name in models:
            vecs = encoders.encoder(name).embed(images)
            for (row, _), v in zip(todo, vecs, strict=True):
                embeddings.append({"item_id": row.id, "model_version": name, "vector": np.asarray(v, "<f4").tobytes()})
        result = session.execute(sa.insert(Embedding).returning(Embedding.seq), embeddings)
        max_seq = max(int(s) for s in result.scalars().all())
    session.commit()
    return AddResult(created, existing, revived, models, max_seq)


def get_item(session: Session, external_id: str) -> ItemInfo:
    """A live item and the models it has embeddings for; NotFound for an unknown or deleted id."""
    row = queries.item_by_external_id(session, external_id)
    if row is None or row.deleted_at is not None:
        raise NotFound("id", f"item {external_id!r} does not exist")
    models = session.scalars(
        sa.select(Embedding.model_version).where(Embedding.item_id == row.id).order_by(Embedding.model_version)
    ).all()
    return ItemInfo(
        item_id=row.id,
        external_id=row.external_id,
        label=row.label,
        created_at=row.created_at,
        updated_at=row.updated_at,
        payload_bytes=len(row.payload),
        embeddings=list(models),
    )


def delete_item(session: Session, external_id: str) -> int:
    """Soft delete; returns the internal item id. `deleted_seq` orders deletes for the followers."""
    row = queries.item_by_external_id(session, external_id, for_update=True)
    if row is None or row.deleted_at is not None:
        session.rollback()
        raise NotFound("id", f"item {external_id!r} does not exist")
    other = aliased(Item)  # an alias, or the subquery would correlate to the row being updated
    next_seq = sa.select(sa.func.coalesce(sa.func.max(other.deleted_seq), 0) + 1).scalar_subquery()
    session.execute(sa.update(Item).where(Item.id == row.id).values(deleted_at=utcnow(), deleted_seq=next_seq))
    session.commit()
    return row.id
