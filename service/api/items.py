"""Gallery endpoints: POST /items, GET /items (pages and counts), GET /items/{id}, DELETE /items/{id}."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from service import events
from service.api.deps import ApiKeyDep, OperatorDep, PageCursor, PageLimit, RuntimeDep, SessionDep, SettingsDep
from service.api.images import decode_image
from service.api.operator_schemas import ItemsPageOut
from service.api.schemas import ITEM_ID_PATTERN, DeletedOut, ItemOut, ItemsIn, ItemsOut, error_responses
from service.gallery import NewItem, add_items, delete_item, get_item
from service.pages import list_items

router = APIRouter(tags=["gallery"])

VISIBILITY_TIMEOUT_SECONDS = 10.0
ItemId = Annotated[str, Path(min_length=1, max_length=256, pattern=ITEM_ID_PATTERN)]


@router.post(
    "/items",
    response_model=ItemsOut,
    dependencies=[OperatorDep],
    responses=error_responses(400, 401, 413, 422, 503),
)
def post_items(body: ItemsIn, session: SessionDep, runtime: RuntimeDep, settings: SettingsDep) -> ItemsOut:
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
    return ItemsOut(
        created=res.created, existing=res.existing, revived=res.revived, models=res.models, searchable=searchable
    )


@router.get(
    "/items",
    response_model=ItemsPageOut,
    dependencies=[ApiKeyDep],
    responses=error_responses(401, 404, 422, 503),
)
def read_items(
    session: SessionDep,
    limit: PageLimit = 100,
    cursor: PageCursor = None,
    model: Annotated[
        str | None, Query(min_length=1, max_length=64, description="Only items embedded in this model's space.")
    ] = None,
) -> ItemsPageOut:
    """Live items in insertion order, a page at a time, with the total (in one model's space with `model`)."""
    return ItemsPageOut.of(list_items(session, limit=limit, cursor=cursor, model=model))


@router.get(
    "/items/{item_id}",
    response_model=ItemOut,
    dependencies=[ApiKeyDep],
    responses=error_responses(401, 404, 422, 503),
)
def read_item(item_id: ItemId, session: SessionDep, runtime: RuntimeDep) -> ItemOut:
    """One item: label, timestamps, the models it has embeddings for, and its index side here."""
    item = get_item(session, item_id)
    ix = runtime.manager.current
    return ItemOut.of(item, side=ix.side_of(item.item_id) if ix is not None else None)


@router.delete(
    "/items/{item_id}",
    response_model=DeletedOut,
    dependencies=[OperatorDep],
    responses=error_responses(401, 404, 422, 503),
)
def remove_item(item_id: ItemId, session: SessionDep, runtime: RuntimeDep) -> DeletedOut:
    """Soft-delete an item; it leaves every index (this process at once, others on their next poll)."""
    delete_item(session, item_id)
    events.publish(runtime.redis, events.EMBEDDINGS, deleted=item_id)
    runtime.follower.sync_and_wait(VISIBILITY_TIMEOUT_SECONDS)
    return DeletedOut(id=item_id, deleted=True)
