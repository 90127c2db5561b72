"""Rollout endpoints: POST /upgrade, GET /rollouts[/{id}], pause/resume/abort, PATCH throttle.

Handlers validate, call one function of `service.rollouts`, enqueue the follow-up job after that function's
commit, and shape the response. Include with `app.include_router(router)`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Path, status
from pydantic import BaseModel, ConfigDict, Field

from service import rollouts as domain
from service.api.deps import OperatorDep, RuntimeDep, SessionDep

log = logging.getLogger(__name__)

router = APIRouter(tags=["rollouts"])


class UpgradeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str = Field(min_length=1, max_length=64, description="Registered model to upgrade to.")
    mode: Literal["reverse", "forward"] = "reverse"
    policy: Literal["uncertainty", "random", "fifo"] = "uncertainty"
    batch_size: int | None = Field(None, ge=1, le=100_000)
    max_items_per_second: float | None = Field(None, gt=0, allow_inf_nan=False)


class ThrottleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_items_per_second: float | None = Field(..., gt=0, allow_inf_nan=False)


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    purge: bool | None = Field(None, description="Delete the target model's embeddings (default: setting).")


RolloutId = Annotated[int, Path(ge=1, le=2**63 - 1)]  # a BIGINT: larger ids are a 422, not a DB error


def _http(e: domain.RolloutError) -> HTTPException:
    return HTTPException(e.status_code, detail=e.detail())


def _view(session: Any, rollout: Any) -> dict[str, Any]:
    view = domain.rollout_view(session, rollout)
    if rollout.active_lock == 1 or rollout.status in ("completed", "aborted", "failed"):
        domain.export_progress(view)
    return view


def _enqueue(runtime: Any, rollout: Any) -> None:
    # After the commit: a job never sees an uncommitted rollout. A Redis failure is not fatal: every worker's
    # maintenance loop re-enqueues what an active rollout needs.
    try:
        domain.enqueue_for(runtime.redis, runtime.settings, rollout)
    except Exception as e:
        log.warning("enqueue for rollout %s failed (%s); workers will pick it up", rollout.id, e)


@router.post("/upgrade", status_code=status.HTTP_202_ACCEPTED, dependencies=[OperatorDep])
def upgrade(body: UpgradeRequest, session: SessionDep, runtime: RuntimeDep) -> dict[str, Any]:
    """Start a rollout to another registered model; 409 while another rollout is active."""
    try:
        rollout = domain.create_rollout(
            session,
            runtime.settings,
            to=body.to,
            mode=body.mode,
            policy=body.policy,
            batch_size=body.batch_size,
            max_items_per_second=body.max_items_per_second,
            r=runtime.redis,
        )
    except domain.RolloutError as e:
        raise _http(e) from e
    _enqueue(runtime, rollout)
    return _view(session, rollout)


@router.get("/rollouts")
def list_rollouts(session: SessionDep) -> dict[str, Any]:
    """Rollouts, newest first."""
    return {"rollouts": [_view(session, r) for r in domain.list_rollouts(session)]}


@router.get("/rollouts/{rollout_id}")
def get_rollout(rollout_id: RolloutId, session: SessionDep) -> dict[str, Any]:
    """One rollout with its progress (counts derived from task states), rate and ETA."""
    try:
        return _view(session, domain.get_rollout(session, rollout_id))
    except domain.RolloutError as e:
        raise _http(e) from e


@router.post("/rollouts/{rollout_id}/pause", dependencies=[OperatorDep])
def pause(rollout_id: RolloutId, session: SessionDep, runtime: RuntimeDep) -> dict[str, Any]:
    """Pause: workers stop after their current batch."""
    try:
        rollout = domain.pause(session, rollout_id, r=runtime.redis)
    except domain.RolloutError as e:
        raise _http(e) from e
    return _view(session, rollout)


@router.post("/rollouts/{rollout_id}/resume", dependencies=[OperatorDep])
def resume(rollout_id: RolloutId, session: SessionDep, runtime: RuntimeDep) -> dict[str, Any]:
    """Resume a paused rollout."""
    try:
        rollout = domain.resume(session, rollout_id, r=runtime.redis)
    except domain.RolloutError as e:
        raise _http(e) from e
    _enqueue(runtime, rollout)
    return _view(session, rollout)


@router.post("/rollouts/{rollout_id}/abort", dependencies=[OperatorDep])
def abort(
    rollout_id: RolloutId,
    session: SessionDep,
    runtime: RuntimeDep,
    body: Annotated[AbortRequest | None, Body()] = None,
) -> dict[str, Any]:
    """Abort: the old model stays serving; `purge` deletes the target model's embeddings."""
    try:
        rollout = domain.abort(session, rollout_id, purge=body.purge if body else None, r=runtime.redis)
    except domain.RolloutError as e:
        raise _http(e) from e
    return _view(session, rollout)


@router.patch("/rollouts/{rollout_id}", dependencies=[OperatorDep])
def throttle(rollout_id: RolloutId, body: ThrottleRequest, session: SessionDep) -> dict[str, Any]:
    """Set or clear (null) the rollout's rate limit in items per second."""
    try:
        rollout = domain.set_throttle(session, rollout_id, body.max_items_per_second)
    except domain.RolloutError as e:
        raise _http(e) from e
    return _view(session, rollout)
