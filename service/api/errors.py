"""Error bodies: every 4xx names the field and the problem, `{"detail": {"field", "problem"}}`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.gallery import GalleryError
from service.runtime import NotReady


class ApiError(Exception):
    """A refused request: HTTP status, the field at fault and what is wrong with it."""

    def __init__(self, status_code: int, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.status_code = status_code
        self.field = field
        self.problem = problem


def error_body(field: str, problem: str, **extra: Any) -> dict[str, Any]:
    return {"detail": {"field": field, "problem": problem}, **extra}


def field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    """("body", "queries", 0, "image_b64") -> "queries[0].image_b64"."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path", "header") and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": field_name(e.get("loc", ())), "problem": str(e.get("msg", "invalid"))} for e in exc.errors()
    ]
    first = errors[0] if errors else {"field": "body", "problem": "invalid request"}
    return JSONResponse(status_code=422, content={"detail": first, "errors": errors})


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError | GalleryError)
    return JSONResponse(status_code=exc.status_code, content=error_body(exc.field, exc.problem))


async def _not_ready(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        status_code=503, content=error_body("service", str(exc)), headers={"Retry-After": "1"}
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(GalleryError, _api_error)
    app.add_exception_handler(NotReady, _not_ready)
    try:  # the worker helper's domain errors, when that module exists
        from service.rollouts import RolloutError
    except ImportError:
        return

    async def _rollout_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RolloutError)
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail()})

    app.add_exception_handler(RolloutError, _rollout_error)
