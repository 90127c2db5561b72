"""POST /search and /search/batch: encode once with the query model, search OLD and NEW, merge.

Concurrent POST /search requests are micro-batched (service/batching.py; `BACKFILL_SEARCH_BATCHING`): the
ones that arrive together share one `Runtime.search` call, each getting exactly its own k hits.

The handlers are `async` and read the runtime and settings from `app.state` directly: a sync handler or a
sync dependency costs a hop to the thread pool each (four per request before), and the response is
serialised once by pydantic instead of being validated again and re-encoded by FastAPI. The blocking work
(decode, encode, search) runs in one worker thread per request, or per batch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool

from service.api import deps
from service.api.images import decode_image
from service.api.schemas import HitOut, SearchBatchIn, SearchBatchOut, SearchIn, SearchOut, ServingOut, error_responses
from service.batching import SearchBatcher
from service.config import Settings
from service.errors import InvalidRequest
from service.metrics import SEARCH_STAGE_SECONDS
from service.runtime import SearchHit, Serving, stage


async def require_api_key(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(deps._bearer)]
) -> None:
    """`deps.require_api_key` without its two thread-pool hops (it and its settings dependency are sync)."""
    deps.require_api_key(request, request.app.state.settings, creds)


router = APIRouter(
    tags=["search"], dependencies=[Depends(require_api_key)], responses=error_responses(400, 401, 413, 422, 503)
)


def _check_k(k: int, settings: Settings) -> None:
    if k > settings.max_k:
        raise InvalidRequest("k", f"must be at most {settings.max_k}")


def _hits(row: list[SearchHit]) -> list[HitOut]:
    return [HitOut.of(h) for h in row]


def _json(out: SearchOut | SearchBatchOut) -> Response:
    """Returned as a Response, FastAPI neither validates the model again nor encodes it a second time."""
    return Response(out.model_dump_json(), media_type="application/json")


def _decode(value: str, field: str, settings: Settings) -> Any:
    with stage("decode"):
        return decode_image(value, field, settings.max_image_pixels)[1]


def batcher(app: FastAPI, settings: Settings) -> SearchBatcher[SearchHit, Serving]:
    """The app's batcher on the running event loop (made on first use; a new loop, as in tests, gets a new one)."""
    loop = asyncio.get_running_loop()
    b: SearchBatcher[SearchHit, Serving] | None = getattr(app.state, "search_batcher", None)
    key = (loop, settings.search_batch_max, settings.search_batch_wait_ms, settings.max_image_pixels)
    if b is None or getattr(app.state, "search_batcher_key", None) != key:
        b = SearchBatcher(
            lambda images, k: app.state.runtime.search(images, k),
            max_batch=settings.search_batch_max,
            max_wait_s=settings.search_batch_wait_ms / 1000,
            prepare=lambda value: _decode(value, "image_b64", settings),
        )
        app.state.search_batcher, app.state.search_batcher_key = b, key
    return b


def _search_one(runtime: Any, settings: Settings, body: SearchIn) -> tuple[list[SearchHit], Serving]:
    img = _decode(body.image_b64, "image_b64", settings)
    results, serving = runtime.search([img], body.k)
    return results[0], serving


@router.post("/search", response_model=SearchOut)
async def search(body: SearchIn, request: Request) -> Response:
    """The k gallery items nearest to one image (merged over OLD and NEW during a rollout)."""
    app: FastAPI = request.app
    settings: Settings = app.state.settings
    _check_k(body.k, settings)
    t0 = time.perf_counter()
    try:
        if settings.search_batching:
            hits, serving = await batcher(app, settings).search(body.image_b64, body.k)
        else:
            hits, serving = await run_in_threadpool(_search_one, app.state.runtime, settings, body)
    finally:
        SEARCH_STAGE_SECONDS.labels(stage="total").observe(time.perf_counter() - t0)
    return _json(SearchOut(results=_hits(hits), serving=ServingOut.of(serving)))


def _search_many(runtime: Any, settings: Settings, body: SearchBatchIn) -> SearchBatchOut:
    with stage("total"):
        with stage("decode"):
            imgs = [
                decode_image(q.image_b64, f"queries[{i}].image_b64", settings.max_image_pixels)[1]
                for i, q in enumerate(body.queries)
            ]
        results, serving = runtime.search(imgs, body.k)
    return SearchBatchOut(results=[_hits(r) for r in results], serving=ServingOut.of(serving))


@router.post("/search/batch", response_model=SearchBatchOut)
async def search_batch(body: SearchBatchIn, request: Request) -> Response:
    """Several queries in one call; results in query order."""
    settings: Settings = request.app.state.settings
    _check_k(body.k, settings)
    if len(body.queries) > settings.max_batch_queries:
        raise InvalidRequest("queries", f"at most {settings.max_batch_queries} queries per call")
    return _json(await run_in_threadpool(_search_many, request.app.state.runtime, settings, body))
