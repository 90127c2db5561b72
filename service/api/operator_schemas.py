"""Response bodies of the operator's endpoints: the item listing, a rollout's failures and their retry, and
the upgrade preview (`POST /upgrade?dry_run=true`). The rest of the API's bodies are in `schemas`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.api.schemas import RolloutOut, Timestamp
from service.pages import FailurePage, ItemPage
from service.preflight import Preview


class ItemSummaryOut(BaseModel):
    id: str
    label: int | None
    created_at: Timestamp
    embeddings: list[str] = Field(description="Models the item has embeddings for.")


class ItemsPageOut(BaseModel):
    items: list[ItemSummaryOut]
    total: int = Field(description="Live items in all (in `model`'s space when `?model=` is given).")
    model: str | None = Field(description="The model space counted and listed, when one was asked for.")
    next_cursor: str | None = Field(description="Pass as `?cursor=` for the next page; null on the last one.")

    @classmethod
    def of(cls, page: ItemPage) -> ItemsPageOut:
        return cls(
            items=[
                ItemSummaryOut(id=i.external_id, label=i.label, created_at=i.created_at, embeddings=i.embeddings)
                for i in page.items
            ],
            total=page.total,
            model=page.model,
            next_cursor=page.next_cursor,
        )


class FailureOut(BaseModel):
    item_id: str = Field(description="The item's external id.")
    attempts: int = Field(description="Attempts spent in the last round (up to BACKFILL_MAX_ATTEMPTS).")
    last_error: str | None
    failed_at: Timestamp


class FailuresOut(BaseModel):
    rollout_id: int
    total: int = Field(description="Failed items of the rollout.")
    reasons: dict[str, int] = Field(description="Failed items per reason (invalid payload, lease expired, ...).")
    failures: list[FailureOut]
    next_cursor: str | None

    @classmethod
    def of(cls, page: FailurePage) -> FailuresOut:
        return cls(
            rollout_id=page.rollout_id,
            total=page.total,
            reasons=page.reasons,
            failures=[
                FailureOut(item_id=f.external_id, attempts=f.attempts, last_error=f.last_error, failed_at=f.failed_at)
                for f in page.failures
            ],
            next_cursor=page.next_cursor,
        )


class RetryOut(BaseModel):
    retried: int = Field(description="Failed items put back to pending.")
    rollout: RolloutOut


class UpgradePreviewOut(BaseModel):
    """What `POST /upgrade` would do now, without doing it."""

    dry_run: bool = True
    from_: str = Field(serialization_alias="from")
    to: str
    items: int = Field(description="Live items the rollout would backfill.")
    compat_pack: str = Field(description='"found", or "trained on the gallery" (a training phase comes first).')
    train_sample: int | None = Field(description="Gallery items the training phase would embed, when it trains.")
    status: str = Field(description="The status the rollout would start in: planning or training.")
    mode: str = Field(description="The query path it would serve first.")
    policy: str
    reason: str | None = Field(description="Why that path and order.")
    predicted: dict[str, Any] | None = Field(description="The pack's predicted curve for that path and order.")
    measured_items_per_second: float | None = Field(
        description="Backfill rate of the last finished rollout (done items over its running time)."
    )
    eta_seconds: float | None = Field(description="items / measured rate; null without a measured rate.")

    @classmethod
    def of(cls, p: Preview) -> UpgradePreviewOut:
        fields = {k: v for k, v in vars(p).items() if k not in ("from_version", "to_version")}
        return cls(from_=p.from_version, to=p.to_version, **fields)
