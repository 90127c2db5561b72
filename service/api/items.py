"""Gallery endpoints: POST /items, GET /items/{id}, DELETE /items/{id}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service import events
from service.api.deps import OperatorDep, RuntimeDep, SessionDep, SettingsDep
from service.api.images import decode_image
from service.gallery import NewItem, add_items, delete_item, get_item

router = APIRouter(tags=["gallery"])

MAX_ITEMS_PER_CALL = 1000
VISIBILITY_TIMEOUT_SECONDS = 10.0


class ItemIn(BaseModel):
    id: str = Field(..., min_length=1, max_length=256, description="External id (idempotency key).")
    image_b64: str = Field(..., min_length=1)
    label: int | None = None


class ItemsIn(BaseModel):
    items: list[ItemIn] = Field(..., min_length=1, max_length=MAX_ITEMS_PER_CALL)


class ItemsOut(BaseModel):
    created: list[str]
    existing: list[str] = Field(description="Live items left unchanged (idempotent re-post).")
    revived: list[str] = Field(description="Deleted items stored again.")
    models: list[str] = Field(description="Models the new items were embedded with.")
    searchable: bool = Field(description="Whether this process's indices include them already.")


@router.post("/items", response_model=ItemsOut, dependencies=[OperatorDep])
def post_items(body: ItemsIn, session: SessionDep, runtime: RuntimeDep, settings: SettingsDep) -> dict[str, Any]:
    """Store items (original bytes + embeddings in one transaction); idempotent on the id."""
    new = []
    for i, it in enumerate(body.items):
        raw, img = decode_image(it.image_b64, f"items[{i}].image_b64", settings.max_image_pixels)
        new.append(NewItem(external_id=it.id, payload=raw, image=img, label=it.label))
    res = add_items(session, runtime, new)
    searchable = True
    if res.created or res.revived:
        events.publish(runtime.redis, events.EMBEDDINGS, max_seq=res.max_seq)
        searchable = runtime.follower.sync_and_wait(VISIBILITY_TIMEOUT_SECONDS)
    return {
        "created": res.created,
        "existing": res.existing,
        "revived": res.revived,
        "models": res.models,
        "searchable": searchable,
    }


@router.get("/items/{item_id}")
def read_item(item_id: str, session: SessionDep, runtime: RuntimeDep) -> dict[str, Any]:
    """One item: label, timestamps, the models it has embeddings for, and its index side here."""
    out = get_item(session, item_id)
    internal = out.pop("_item_id")
    ix = runtime.manager.current
    out["side"] = ix.side_of(internal) if ix is not None else None
    return out


@router.delete("/items/{item_id}", dependencies=[OperatorDep])
def remove_item(item_id: str, session: SessionDep, runtime: RuntimeDep) -> dict[str, Any]:
    """Soft-delete an item; it leaves every index (this process at once, others on their next poll)."""
    delete_item(session, item_id)
    events.publish(runtime.redis, events.EMBEDDINGS, deleted=item_id)
    runtime.follower.sync_and_wait(VISIBILITY_TIMEOUT_SECONDS)
    return {"id": item_id, "deleted": True}
