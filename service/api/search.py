"""POST /search and /search/batch: encode once with the query model, search OLD and NEW, merge."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.api.deps import ApiKeyDep, RuntimeDep, SettingsDep
from service.api.errors import ApiError
from service.api.images import decode_image
from service.config import Settings
from service.runtime import SearchHit, stage

router = APIRouter(tags=["search"], dependencies=[ApiKeyDep])


class SearchIn(BaseModel):
    image_b64: str = Field(..., min_length=1, description="PNG, JPEG or NPY bytes, base64-encoded.")
    k: int = Field(10, ge=1, description="Number of results (at most the max_k setting).")


class QueryIn(BaseModel):
    image_b64: str = Field(..., min_length=1)


class SearchBatchIn(BaseModel):
    queries: list[QueryIn] = Field(..., min_length=1)
    k: int = Field(10, ge=1)


class HitOut(BaseModel):
    id: str
    distance: float
    source: str = Field(description='"new" (target-model index) or "old" (not yet backfilled).')


class ServingOut(BaseModel):
    model: str | None = Field(description="The model that encoded the query.")
    rollout_id: int | None
    backfilled_fraction: float = Field(description="Share of the gallery in the target space (1 outside).")
    mode: str | None = None


class SearchOut(BaseModel):
    results: list[HitOut]
    serving: ServingOut


class SearchBatchOut(BaseModel):
    results: list[list[HitOut]]
    serving: ServingOut


def _check_k(k: int, settings: Settings) -> None:
    if k > settings.max_k:
        raise ApiError(422, "k", f"must be at most {settings.max_k}")


def _hits(row: list[SearchHit]) -> list[dict[str, Any]]:
    return [{"id": h.id, "distance": h.distance, "source": h.source} for h in row]


@router.post("/search", response_model=SearchOut)
def search(body: SearchIn, runtime: RuntimeDep, settings: SettingsDep) -> dict[str, Any]:
    """The k gallery items nearest to one image (merged over OLD and NEW during a rollout)."""
    _check_k(body.k, settings)
    with stage("total"):
        with stage("decode"):
            _, img = decode_image(body.image_b64, "image_b64", settings.max_image_pixels)
        results, serving = runtime.search(img[None], body.k)
    return {"results": _hits(results[0]), "serving": serving.as_dict()}


@router.post("/search/batch", response_model=SearchBatchOut)
def search_batch(body: SearchBatchIn, runtime: RuntimeDep, settings: SettingsDep) -> dict[str, Any]:
    """Several queries in one call; results in query order."""
    _check_k(body.k, settings)
    if len(body.queries) > settings.max_batch_queries:
        raise ApiError(422, "queries", f"at most {settings.max_batch_queries} queries per call")
    with stage("total"):
        with stage("decode"):
            imgs = np.stack(
                [
                    decode_image(q.image_b64, f"queries[{i}].image_b64", settings.max_image_pixels)[1]
                    for i, q in enumerate(body.queries)
                ]
            )
        results, serving = runtime.search(imgs, body.k)
    return {"results": [_hits(r) for r in results], "serving": serving.as_dict()}
