"""Keyset pagination over the items and the failed backfill tasks: `GET /items` and
`GET /rollouts/{id}/failures`, as plain functions over a Session.

A cursor is the last internal id of the previous page, encoded (`c1.<id>`, base64url) so clients treat it as
opaque; pages are ordered by that id, so a page is stable under concurrent inserts (new rows come after)
and costs an index range scan however deep it is.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections import Counter
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.db.models import BackfillTask, Embedding, Item, ModelVersion
from service.errors import InvalidRequest, NotFound

MAX_PAGE = 1000


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"c1.{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    """The id after which the page starts (0: the first page); a cursor this service did not write is a 422."""
    if not cursor:
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    m = re.fullmatch(r"c1\.(\d{1,19})", text)
    if m is None:
        raise InvalidRequest("cursor", "not a cursor this API returned (pass next_cursor as it came)")
    return int(m.group(1))


# --- items -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemRow:
    item_id: int
    external_id: str
    label: int | None
    created_at: dt.datetime
    embeddings: list[str]


@dataclass(frozen=True)
class ItemPage:
    items: list[ItemRow]
    total: int  # live items (in `model`'s space when one is given)
    next_cursor: str | None
    model: str | None


def list_items(session: Session, *, limit: int = 100, cursor: str | None = None, model: str | None = None) -> ItemPage:
    """Live items in id order after `cursor`, and how many there are in all; `model` keeps only the items
    that have an embedding in that model's space (so `total` counts that space)."""
    after = decode_cursor(cursor)
    limit = max(1, min(MAX_PAGE, limit))
    where: list[sa.ColumnElement[bool]] = [Item.deleted_at.is_(None)]
    if model is not None:
        if session.get(ModelVersion, model) is None:
            raise NotFound("model", f"model {model!r} is not registered")
        where.append(sa.exists().where(Embedding.item_id == Item.id, Embedding.model_version == model))
    total = int(session.scalar(sa.select(sa.func.count()).select_from(Item).where(*where)) or 0)
    rows = session.execute(
        sa.select(Item.id, Item.external_id, Item.label, Item.created_at)
        .where(Item.id > after, *where)
        .order_by(Item.id)
        .limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    spaces: dict[int, list[str]] = {int(r[0]): [] for r in rows}
    if spaces:
        for iid, name in session.execute(
            sa.select(Embedding.item_id, Embedding.model_version)
            .where(Embedding.item_id.in_(list(spaces)))
            .order_by(Embedding.model_version)
        ).all():
            spaces[int(iid)].append(str(name))
    items = [ItemRow(int(i), str(ext), label, created, spaces[int(i)]) for i, ext, label, created in rows]
    return ItemPage(items, total, encode_cursor(items[-1].item_id) if more else None, model)


# --- failed backfill tasks ---------------------------------------------------------------------------------
REASON = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]{0,60}):")


def reason_of(last_error: str | None) -> str:
    """A short, bounded class of a task's last error (a metric label, a summary key): "invalid payload",
    "lease expired", or the exception type that ended the attempt."""
    text = (last_error or "").strip()
    if not text:
        return "unknown"
    if text.startswith("invalid payload"):
        return "invalid payload"
    if "lease expired" in text:
        return "lease expired"
    m = REASON.match(text)
    return m.group(1).rsplit(".", 1)[-1] if m else "other"


@dataclass(frozen=True)
class FailureRow:
    external_id: str
    attempts: int
    last_error: str | None
    failed_at: dt.datetime


@dataclass(frozen=True)
class FailurePage:
    rollout_id: int
    total: int
    reasons: dict[str, int]
    failures: list[FailureRow]
    next_cursor: str | None


def failure_reasons(session: Session, rollout_id: int) -> dict[str, int]:
    """Failed tasks of a rollout per reason, largest first."""
    counts: Counter[str] = Counter()
    for err, n in session.execute(
        sa.select(BackfillTask.last_error, sa.func.count())
        .where(BackfillTask.rollout_id == rollout_id, BackfillTask.state == "failed")
        .group_by(BackfillTask.last_error)
    ).all():
        counts[reason_of(err)] += int(n)
    return dict(counts.most_common())


def list_failures(session: Session, rollout_id: int, *, limit: int = 100, cursor: str | None = None) -> FailurePage:
    """The rollout's failed tasks (item, attempts, last error, when), in task order after `cursor`."""
    after = decode_cursor(cursor)
    limit = max(1, min(MAX_PAGE, limit))
    t = BackfillTask
    rows = session.execute(
        sa.select(t.id, Item.external_id, t.attempts, t.last_error, t.updated_at)
        .join(Item, Item.id == t.item_id)
        .where(t.rollout_id == rollout_id, t.state == "failed", t.id > after)
        .order_by(t.id)
        .limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    reasons = failure_reasons(session, rollout_id)
    failures = [FailureRow(str(ext), int(att), err, at) for _, ext, att, err, at in rows]
    next_cursor = encode_cursor(int(rows[-1][0])) if more else None
    return FailurePage(rollout_id, sum(reasons.values()), reasons, failures, next_cursor)


def export_failure_reasons(session: Session, rollout_id: int) -> None:
    """Set the failures-by-reason gauge (Grafana's "Failed items by reason") from the rollout's tasks."""
    from service import metrics

    reasons = failure_reasons(session, rollout_id)
    metrics.ROLLOUT_FAILED_BY_REASON.clear()
    for reason, n in reasons.items():
        metrics.ROLLOUT_FAILED_BY_REASON.labels(reason=reason).set(n)
