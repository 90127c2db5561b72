"""A rollout's failed items: `GET /rollouts/{id}/failures` (which items, how many attempts, the last error,
per reason) and `POST /rollouts/{id}/retry-failed` (operator: another round of attempts; a rollout that
ended `failed` becomes active again). Included next to the rollout router."""

from __future__ import annotations

from fastapi import APIRouter

from service import rollouts as domain
from service.api.deps import ApiKeyDep, OperatorDep, PageCursor, PageLimit, RuntimeDep, SessionDep
from service.api.operator_schemas import FailuresOut, RetryOut
from service.api.rollouts import RolloutId, enqueue_after_commit, rollout_out
from service.api.schemas import error_responses
from service.pages import list_failures
from service.retry import retry_failed

router = APIRouter(tags=["rollouts"])


@router.get(
    "/rollouts/{rollout_id}/failures",
    response_model=FailuresOut,
    dependencies=[ApiKeyDep],
    responses=error_responses(401, 404, 422, 503),
)
def failures(
    rollout_id: RolloutId,
    session: SessionDep,
    limit: PageLimit = 100,
    cursor: PageCursor = None,
) -> FailuresOut:
    """The rollout's failed items (id, attempts, last error, when), a page at a time, and counts per reason."""
    domain.get_rollout(session, rollout_id)
    return FailuresOut.of(list_failures(session, rollout_id, limit=limit, cursor=cursor))


@router.post(
    "/rollouts/{rollout_id}/retry-failed",
    response_model=RetryOut,
    dependencies=[OperatorDep],
    responses=error_responses(400, 401, 404, 409, 422, 503),
)
def retry(rollout_id: RolloutId, session: SessionDep, runtime: RuntimeDep) -> RetryOut:
    """Put the failed items back to pending with fresh attempts; a `failed` rollout runs again (409 when it
    has none, is not the newest, or another rollout is active)."""
    rollout, n = retry_failed(session, rollout_id, r=runtime.redis)
    enqueue_after_commit(runtime, rollout)
    return RetryOut(retried=n, rollout=rollout_out(session, runtime, rollout))
