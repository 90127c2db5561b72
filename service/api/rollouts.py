"""Rollout endpoints: POST /upgrade, GET /rollouts[/{id}], pause/resume/abort/rollback, PATCH (throttle, path).

Handlers validate, call one function of `service.rollouts`, enqueue the follow-up job after that function's
commit, and shape the response; a refused operation raises the domain's error, which the app's handler
(`service.api.errors`) answers. Include with `app.include_router(router)`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, status
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from service import preflight
from service import rollback as rollback_domain
from service import rollouts as domain
from service.api.deps import ApiKeyDep, OperatorDep, RuntimeDep, SessionDep
from service.api.operator_schemas import UpgradePreviewOut
from service.api.schemas import (
    AbortRequest,
    RolloutOut,
    RolloutPatch,
    RolloutsOut,
    UpgradeRequest,
    WorkersOut,
    error_responses,
)
from service.db.models import Rollout
from service.liveness import safe_liveness

log = logging.getLogger(__name__)

router = APIRouter(tags=["rollouts"])

RolloutId = Annotated[int, Path(ge=1, le=2**63 - 1)]  # a BIGINT: larger ids are a 422, not a DB error

# A body that is not JSON (400) or too large (413), bad input (422), a refused transition (409).
_CONTROL = error_responses(400, 401, 404, 409, 413, 422, 503)


def _view(session: Session, rollout: Rollout, view: domain.RolloutView | None = None) -> RolloutOut:
    view = view or domain.rollout_view(session, rollout)
    if rollout.active_lock == 1:  # the gauges describe the active rollout; the runtime refreshes the rest
        domain.export_progress(view)
    return RolloutOut.of(view)


def enqueue_after_commit(runtime: Any, rollout: Rollout) -> None:
    # After the commit: a job never sees an uncommitted rollout. A Redis failure is not fatal: every worker's
    # maintenance loop re-enqueues what an active rollout needs.
    try:
        domain.enqueue_for(runtime.redis, runtime.settings, rollout)
    except Exception as e:
        log.warning("enqueue for rollout %s failed (%s); workers will pick it up", rollout.id, e)


def rollout_out(session: Session, runtime: Any, rollout: Rollout, view: domain.RolloutView | None = None) -> RolloutOut:
    """The rollout's view and, while it is active, who works on it (a warning when nothing does)."""
    out = _view(session, rollout, view)
    if rollout.active_lock == 1 and runtime is not None:
        live = safe_liveness(runtime.redis, runtime.settings, rollout, out.total - out.done - out.failed)
        if live is not None:
            out.workers = WorkersOut(registered=live.workers, jobs_alive=live.jobs_alive, warning=live.warning)
    return out


@router.post(
    "/upgrade",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RolloutOut,
    dependencies=[OperatorDep],
    responses={**_CONTROL, 200: {"model": UpgradePreviewOut, "description": "The dry run's preview"}},
)
def upgrade(
    body: UpgradeRequest,
    session: SessionDep,
    runtime: RuntimeDep,
    dry_run: Annotated[bool, Query(description="Answer what would happen (200), changing nothing.")] = False,
) -> Any:
    """Start a rollout to another registered model; 409 while another rollout is active. `?dry_run=true`
    answers 200 with what it would do (items, compat pack or training, path, predicted curve, ETA)."""
    if dry_run:
        p = preflight.preview_upgrade(
            session,
            runtime.settings,
            to=body.to,
            mode=body.mode,
            policy=body.policy,
            batch_size=body.batch_size,
            max_items_per_second=body.max_items_per_second,
            force=body.force,
        )
        preview = UpgradePreviewOut.of(p)
        return JSONResponse(preview.model_dump(mode="json", by_alias=True), status_code=200)
    rollout = domain.create_rollout(
        session,
        runtime.settings,
        to=body.to,
        mode=body.mode,
        policy=body.policy,
        batch_size=body.batch_size,
        max_items_per_second=body.max_items_per_second,
        force=body.force,
        r=runtime.redis,
    )
    enqueue_after_commit(runtime, rollout)
    return _view(session, rollout)


@router.get("/rollouts", response_model=RolloutsOut, dependencies=[ApiKeyDep], responses=error_responses(401, 503))
def list_rollouts(session: SessionDep, runtime: RuntimeDep) -> RolloutsOut:
    """Rollouts, newest first."""
    views = domain.rollout_views(session, domain.list_rollouts(session))  # one grouped count, not one per rollout
    return RolloutsOut(rollouts=[rollout_out(session, runtime, v.rollout, v) for v in views])


@router.get(
    "/rollouts/{rollout_id}",
    response_model=RolloutOut,
    dependencies=[ApiKeyDep],
    responses=error_responses(401, 404, 422, 503),
)
def get_rollout(rollout_id: RolloutId, session: SessionDep, runtime: RuntimeDep) -> RolloutOut:
    """One rollout with its progress (counts derived from task states), rate, ETA, and its workers."""
    return rollout_out(session, runtime, domain.get_rollout(session, rollout_id))


@router.post(
    "/rollouts/{rollout_id}/pause",
    response_model=RolloutOut,
    dependencies=[OperatorDep],
    responses=error_responses(400, 401, 404, 409, 422, 503),
)
def pause(rollout_id: RolloutId, session: SessionDep, runtime: RuntimeDep) -> RolloutOut:
    """Pause: workers stop after their current batch."""
    return _view(session, domain.pause(session, rollout_id, r=runtime.redis))


@router.post(
    "/rollouts/{rollout_id}/resume",
    response_model=RolloutOut,
    dependencies=[OperatorDep],
    responses=error_responses(400, 401, 404, 409, 422, 503),
)
def resume(rollout_id: RolloutId, session: SessionDep, runtime: RuntimeDep) -> RolloutOut:
    """Resume a paused rollout."""
    rollout = domain.resume(session, rollout_id, r=runtime.redis)
    enqueue_after_commit(runtime, rollout)
    return _view(session, rollout)


@router.post(
    "/rollouts/{rollout_id}/abort",
    response_model=RolloutOut,
    dependencies=[OperatorDep],
    responses=_CONTROL,
)
def abort(
    rollout_id: RolloutId,
    session: SessionDep,
    runtime: RuntimeDep,
    body: Annotated[AbortRequest | None, Body()] = None,
) -> RolloutOut:
    """Abort: the old model stays serving; `purge` deletes the target model's embeddings."""
    rollout = domain.abort(session, rollout_id, purge=body.purge if body else None, r=runtime.redis)
    return _view(session, rollout)


@router.post(
    "/rollouts/{rollout_id}/rollback",
    response_model=RolloutOut,
    dependencies=[OperatorDep],
    responses=_CONTROL,
)
def rollback(rollout_id: RolloutId, session: SessionDep, runtime: RuntimeDep) -> RolloutOut:
    """After completion: the previous model serves again from its retained vectors (no re-encoding); 409 once
    they are swept, for items added since, or when it is not the newest upgrade."""
    return _view(session, rollback_domain.rollback(session, rollout_id, r=runtime.redis))


@router.patch(
    "/rollouts/{rollout_id}",
    response_model=RolloutOut,
    dependencies=[OperatorDep],
    responses=_CONTROL,
)
def patch_rollout(rollout_id: RolloutId, body: RolloutPatch, session: SessionDep, runtime: RuntimeDep) -> RolloutOut:
    """Set or clear (null) the rollout's rate limit in items per second, and/or move it to another query
    path (`mode`: auto or a path; 409 with the predicted dip unless `force`)."""
    throttle = (body.max_items_per_second,) if "max_items_per_second" in body.model_fields_set else None
    rollout = domain.update(
        session, runtime.settings, rollout_id, throttle=throttle, mode=body.mode, force=body.force, r=runtime.redis
    )
    return _view(session, rollout)
