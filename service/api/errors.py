"""Error bodies: every 4xx names the field and the problem, `{"detail": {"field", "problem"}}`."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.gallery import GalleryError
from service.rollouts import RolloutError
from service.runtime import NotReady

log = logging.getLogger(__name__)


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


def _describe(e: dict[str, Any]) -> dict[str, str]:
    if e.get("type") == "json_invalid":  # loc is ("body", <character position>), not a field
        loc = e.get("loc", ())
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        error = (e.get("ctx") or {}).get("error", "")
        return {"field": "body", "problem": f"invalid JSON{where}" + (f" ({error})" if error else "")}
    return {"field": field_name(e.get("loc", ())), "problem": str(e.get("msg", "invalid"))}


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [_describe(e) for e in exc.errors()]
    first = errors[0] if errors else {"field": "body", "problem": "invalid request"}
    return JSONResponse(status_code=422, content={"detail": first, "errors": errors})


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError | GalleryError)
    return JSONResponse(status_code=exc.status_code, content=error_body(exc.field, exc.problem))


_HTTP_FIELDS = {400: "body", 404: "path", 405: "method"}


async def _http_exception(_: Request, exc: Exception) -> JSONResponse:
    """Starlette/FastAPI HTTPExceptions in the same `{"detail": {"field", "problem"}}` shape: e.g. a body
    that is not UTF-8 JSON ("There was an error parsing the body", 400) or an unknown route."""
    assert isinstance(exc, StarletteHTTPException)
    detail: Any = exc.detail
    if not (isinstance(detail, dict) and {"field", "problem"} <= detail.keys()):
        detail = {"field": _HTTP_FIELDS.get(exc.status_code, "request"), "problem": str(detail)}
    return JSONResponse(status_code=exc.status_code, content={"detail": detail}, headers=exc.headers)


async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    """Postgres or Redis unreachable (an outage, a restart): 503 + Retry-After, not a 500 - the request was
    fine and a retry will succeed once the dependency is back. Search itself needs neither."""
    what = "redis" if isinstance(exc, redis.RedisError) else "database"
    log.warning("%s unavailable: %s", what, type(exc).__name__)
    return JSONResponse(
        status_code=503,
        content=error_body(what, f"{what} unavailable ({type(exc).__name__}); retry later"),
        headers={"Retry-After": "2"},
    )


async def _not_ready(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=503, content=error_body("service", str(exc)), headers={"Retry-After": "1"})


_DETAIL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["field", "problem"],
    "properties": {"field": {"type": "string"}, "problem": {"type": "string"}},
}
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": _DETAIL_SCHEMA,
        "errors": {"type": "array", "items": _DETAIL_SCHEMA, "description": "Every validation error (422)."},
    },
}
_DESCRIPTIONS = {
    400: "Refused request",
    401: "Missing or invalid credentials",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Request body too large",
    422: "Invalid input; `detail.field` names it",
    503: "Not ready (indices loading, database unreachable)",
}


def document_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """Publish the error responses the app really sends: FastAPI's generated schema declares its default
    422 body (`{"detail": [...]}`), not this app's `{"detail": {"field", "problem"}}`, and no 401/404/409/
    413/503 at all, so generated clients and schema-driven tests would be misled."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/Error"}
    for path, ops in spec.get("paths", {}).items():
        for op in ops.values():
            codes = set() if path == "/healthz" else {503}
            params = op.get("parameters", [])
            if "requestBody" in op or params:
                codes.add(422)
            if "requestBody" in op:
                codes |= {400, 413}  # 400: a body that is not UTF-8 JSON
            if any(p.get("in") == "path" for p in params):
                codes.add(404)
            if op.get("security") or path.startswith("/search"):
                codes.add(401)
            if path == "/upgrade" or path.startswith("/rollouts/"):
                codes |= {400, 404, 409}
            responses = op.setdefault("responses", {})
            for code in sorted(codes):
                responses[str(code)] = {
                    "description": _DESCRIPTIONS[code],
                    "content": {"application/json": {"schema": ref}},
                }
    return spec


def install(app: FastAPI) -> None:
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(default_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(GalleryError, _api_error)
    app.add_exception_handler(NotReady, _not_ready)
    app.add_exception_handler(sa_exc.OperationalError, _unavailable)
    app.add_exception_handler(redis.ConnectionError, _unavailable)
    app.add_exception_handler(redis.TimeoutError, _unavailable)

    async def _rollout_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RolloutError)
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail()})

    app.add_exception_handler(RolloutError, _rollout_error)
