"""Operational endpoints: /healthz, /readyz, /metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import RuntimeDep
from service.api.schemas import HealthOut, ReadyOut, ReadyServing
from service.db import queries
from service.liveness import safe_liveness
from service.metrics import registry

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=HealthOut)
def healthz() -> HealthOut:
    """The process is alive."""
    return HealthOut()


def _probe(check: Callable[[], object]) -> str:
    try:
        check()
    except Exception as e:
        return f"error: {type(e).__name__}"
    return "ok"


def _ping_database(runtime: Any) -> None:
    with runtime.engine.connect() as c:
        c.execute(sa.text("SELECT 1"))


def _indices(runtime: Any) -> tuple[str, ReadyServing | None]:
    ix = runtime.manager.current
    if not runtime.ready or ix is None:
        return "loading", None
    if ix.layout.query_model is None:
        return "no model is serving; register artifacts", None
    sides = ix.sides()
    lay = ix.layout
    return "ok", ReadyServing(model=lay.query_model, rollout_id=lay.rollout_id, new=sides["new"], old=sides["old"])


def _rollout_warning(runtime: Any) -> str | None:
    """The active rollout's liveness warning (no live worker), or None; never fails the probe."""
    from service.rollouts import task_counts

    try:
        with runtime.sessionmaker() as s:
            rollout = queries.active_rollout(s)
            if rollout is None:
                return None
            counts = task_counts(s, rollout.id)
            live = safe_liveness(runtime.redis, runtime.settings, rollout, counts["pending"] + counts["leased"])
    except Exception:
        return None
    return None if live is None else live.warning


@router.get(
    "/readyz",
    response_model=ReadyOut,
    response_model_exclude_unset=True,  # `serving` and `ingestion` only when there is something to say
    responses={503: {"model": ReadyOut, "description": "Not ready: the checks that are not ok say why"}},
)
def readyz(runtime: RuntimeDep, response: Response) -> ReadyOut:
    """Ready when the database and Redis answer and the indices are loaded; 503 otherwise."""
    database = _probe(lambda: _ping_database(runtime))
    redis = _probe(runtime.redis.ping)
    indices, serving = _indices(runtime)
    ok = database == redis == indices == "ok"
    response.status_code = 200 if ok else 503
    out = ReadyOut(status="ready" if ok else "not ready", database=database, redis=redis, indices=indices)
    if serving is not None:
        out.serving = serving
    if runtime.follower is not None and runtime.follower.last_error:
        # the exception's type only: its text can carry SQL, hosts or paths (the log has the whole of it)
        out.ingestion = "error: " + runtime.follower.last_error.split(":", 1)[0]
    warning = _rollout_warning(runtime) if database == "ok" and redis == "ok" else None
    if warning is not None:
        out.rollout = warning
    return out


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    """Prometheus exposition (aggregated across workers when PROMETHEUS_MULTIPROC_DIR is set)."""
    return Response(generate_latest(registry()), media_type=CONTENT_TYPE_LATEST)
