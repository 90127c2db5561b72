"""FastAPI dependencies as Annotated aliases: settings, DB session, runtime, operator auth."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.config import Settings
from service.pages import MAX_PAGE

_bearer = HTTPBearer(auto_error=False, description="Operator token")


def get_runtime(request: Request) -> Any:
    return request.app.state.runtime


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.runtime.sessionmaker() as session:
        yield session


def _operator_token_ok(settings: Settings, creds: HTTPAuthorizationCredentials | None) -> bool:
    expected = settings.operator_token.get_secret_value().encode()
    given = (creds.credentials if creds and creds.scheme.lower() == "bearer" else "").encode()
    return bool(given) and hmac.compare_digest(given, expected)


def require_operator(
    settings: Annotated[Settings, Depends(get_settings_dep)],
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Bearer operator token, compared in constant time."""
    if not _operator_token_ok(settings, creds):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail={"field": "Authorization", "problem": "missing or invalid operator bearer token"},
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_api_key(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings_dep)],
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Every read (search, items, models, rollouts) needs an X-API-Key when API keys are configured, or the
    operator token (the CLI reads rollouts with it); open when none are configured."""
    if not settings.api_keys:
        return
    given = request.headers.get("x-api-key", "").encode()
    if any(hmac.compare_digest(given, k.encode()) for k in settings.api_keys) or _operator_token_ok(settings, creds):
        return
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail={"field": "X-API-Key", "problem": "missing or invalid API key"}
    )


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
RuntimeDep = Annotated[Any, Depends(get_runtime)]
OperatorDep = Depends(require_operator)
ApiKeyDep = Depends(require_api_key)


# Keyset pages (`GET /items`, `GET /rollouts/{id}/failures`; service/pages.py).
PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Results per page.")]
PageCursor = Annotated[str | None, Query(max_length=64, description="`next_cursor` of the previous page.")]
