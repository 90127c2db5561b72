"""POST /search and /search/batch: encode once with the query model, search OLD and NEW, merge."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import ApiKeyDep, RuntimeDep, SettingsDep
from service.api.images import decode_image
from service.api.schemas import HitOut, SearchBatchIn, SearchBatchOut, SearchIn, SearchOut, ServingOut, error_responses
from service.config import Settings
from service.errors import InvalidRequest
from service.runtime import SearchHit, stage

router = APIRouter(tags=["search"], dependencies=[ApiKeyDep], responses=error_responses(400, 401, 413, 422, 503))


def _check_k(k: int, settings: Settings) -> None:
    if k > settings.max_k:
        raise InvalidRequest("k", f"must be at most {settings.max_k}")


def _hits(row: list[SearchHit]) -> list[HitOut]:
    return [HitOut.of(h) for h in row]


@router.post("/search", response_model=SearchOut)
def search(body: SearchIn, runtime: RuntimeDep, settings: SettingsDep) -> SearchOut:
    """The k gallery items nearest to one image (merged over OLD and NEW during a rollout)."""
    _check_k(body.k, settings)
    with stage("total"):
        with stage("decode"):
            _, img = decode_image(body.image_b64, "image_b64", settings.max_image_pixels)
        results, serving = runtime.search([img], body.k)
    return SearchOut(results=_hits(results[0]), serving=ServingOut.of(serving))


@router.post("/search/batch", response_model=SearchBatchOut)
def search_batch(body: SearchBatchIn, runtime: RuntimeDep, settings: SettingsDep) -> SearchBatchOut:
    """Several queries in one call; results in query order."""
    _check_k(body.k, settings)
    if len(body.queries) > settings.max_batch_queries:
        raise InvalidRequest("queries", f"at most {settings.max_batch_queries} queries per call")
    with stage("total"):
        with stage("decode"):
            imgs = [
                decode_image(q.image_b64, f"queries[{i}].image_b64", settings.max_image_pixels)[1]
                for i, q in enumerate(body.queries)
            ]
        results, serving = runtime.search(imgs, body.k)
    return SearchBatchOut(results=[_hits(r) for r in results], serving=ServingOut.of(serving))
