"""Operational endpoints: /healthz, /readyz, /metrics, GET /models."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import RuntimeDep, SessionDep
from service.metrics import registry
from service.registry import list_models

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Ready when the database and Redis answer and the indices are loaded; 503 otherwise."""
    checks: dict[str, Any] = {}
    try:
        with runtime.engine.connect() as c:
            c.execute(sa.text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"error: {type(e).__name__}"
    try:
        runtime.redis.ping()
        checks["redis"] = "ok"
    except Exception as e:
        checks["redis"] = f"error: {type(e).__name__}"
    ix = runtime.manager.current
    if not runtime.ready or ix is None:
        checks["indices"] = "loading"
    elif ix.layout.query_model is None:
        checks["indices"] = "no model is serving; register artifacts"
    else:
        checks["indices"] = "ok"
        checks["serving"] = {"model": ix.layout.query_model, "rollout_id": ix.layout.rollout_id, **ix.sides()}
    if runtime.follower is not None and runtime.follower.last_error:
        checks["ingestion"] = runtime.follower.last_error
    ok = all(checks[k] == "ok" for k in ("database", "redis", "indices"))
    return JSONResponse(status_code=200 if ok else 503, content={"status": "ready" if ok else "not ready", **checks})


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    """Prometheus exposition (aggregated across workers when PROMETHEUS_MULTIPROC_DIR is set)."""
    return Response(generate_latest(registry()), media_type=CONTENT_TYPE_LATEST)


@router.get("/models")
def models(session: SessionDep) -> dict[str, Any]:
    """Registered model versions and compatibility packs."""
    return list_models(session)
