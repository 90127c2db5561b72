"""Error bodies: every 4xx/5xx names the field and the problem, `{"detail": {"field", "problem"}}`.

One handler turns the domain's `DomainError` into its status code; the others give FastAPI's own refusals
(validation, HTTP exceptions), a value the database refuses (422) and an unreachable database or Redis
(503) the same body. The shape is declared on
every route through `schemas.error_responses`.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.schemas import ErrorBody, ErrorDetail
from service.errors import DomainError, ErrorKind

log = logging.getLogger(__name__)

STATUS_OF_KIND: dict[ErrorKind, int] = {
    ErrorKind.INVALID: 422,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.NOT_READY: 503,
}
RETRY_AFTER_NOT_READY = "1"


def error_json(field: str, problem: str, errors: list[ErrorDetail] | None = None) -> dict[str, Any]:
    body = ErrorBody(detail=ErrorDetail(field=field, problem=problem), errors=errors)
    return body.model_dump(exclude_none=True)


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


_BASE64_ERRORS = {"string_pattern_mismatch", "string_too_short"}  # what the `*_b64` fields' schema refuses


def _describe(e: dict[str, Any]) -> ErrorDetail:
    if e.get("type") == "json_invalid":  # loc is ("body", <character position>), not a field
        loc = e.get("loc", ())
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        error = (e.get("ctx") or {}).get("error", "")
        return ErrorDetail(field="body", problem=f"invalid JSON{where}" + (f" ({error})" if error else ""))
    loc = tuple(e.get("loc", ()))
    if loc and str(loc[-1]).endswith("_b64") and e.get("type") in _BASE64_ERRORS:
        return ErrorDetail(field=field_name(loc), problem="not valid base64 (standard alphabet, padded)")
    return ErrorDetail(field=field_name(loc), problem=str(e.get("msg", "invalid")))


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    """Request validation: 422 naming the first field at fault, with every error in `errors`."""
    assert isinstance(exc, RequestValidationError)
    errors = [_describe(e) for e in exc.errors()]
    first = errors[0] if errors else ErrorDetail(field="body", problem="invalid request")
    return JSONResponse(status_code=422, content=error_json(first.field, first.problem, errors))


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    """A refused domain operation: its kind's status code; 503s say when to retry."""
    assert isinstance(exc, DomainError)
    headers = {"Retry-After": RETRY_AFTER_NOT_READY} if exc.kind is ErrorKind.NOT_READY else None
    content = error_json(exc.field, exc.problem)
    return JSONResponse(status_code=STATUS_OF_KIND[exc.kind], content=content, headers=headers)


_HTTP_FIELDS = {400: "body", 404: "path", 405: "method"}


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers at this path. Starlette's 405 names only the methods of
    the first route whose path matched (`Allow: GET` on /items/{id}, though DELETE is served there too)."""
    methods: set[str] = set()

    def walk(routes: list[Any], path: str) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)  # an included router, kept whole
            if inner is not None:
                prefix = getattr(getattr(route, "include_context", None), "prefix", "") or ""
                if path.startswith(prefix):
                    walk(inner.routes, path[len(prefix) :])
                continue
            regex = getattr(route, "path_regex", None)
            if regex is not None and regex.match(path):
                methods.update(getattr(route, "methods", None) or ())

    walk(request.app.routes, request.url.path)
    return sorted(methods)


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    """Starlette/FastAPI HTTPExceptions in the same `{"detail": {"field", "problem"}}` shape: e.g. a body
    that is not UTF-8 JSON ("There was an error parsing the body", 400) or an unknown route."""
    assert isinstance(exc, StarletteHTTPException)
    detail: Any = exc.detail
    if isinstance(detail, dict) and {"field", "problem"} <= detail.keys():
        content = error_json(str(detail["field"]), str(detail["problem"]))
    else:
        content = error_json(_HTTP_FIELDS.get(exc.status_code, "request"), str(detail))
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and (methods := allowed_methods(request)):
        headers["Allow"] = ", ".join(methods)
    return JSONResponse(status_code=exc.status_code, content=content, headers=headers or None)


async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    """Postgres or Redis unreachable (an outage, a restart): 503 + Retry-After, not a 500 - the request was
    fine and a retry will succeed once the dependency is back. Search itself needs neither."""
    what = "redis" if isinstance(exc, redis.RedisError) else "database"
    log.warning("%s unavailable: %s", what, type(exc).__name__)
    return JSONResponse(
        status_code=503,
        content=error_json(what, f"{what} unavailable ({type(exc).__name__}); retry later"),
        headers={"Retry-After": "2"},
    )


async def _data_error(_: Request, exc: Exception) -> JSONResponse:
    """A value the database refuses (a NUL byte in text, an integer beyond its column, an invalid literal):
    the request is at fault, so a 422 and not a 500. The driver's first line says what; the SQL never leaves
    the server (it is logged at debug level only)."""
    assert isinstance(exc, sa_exc.DataError)
    lines = str(exc.orig if exc.orig is not None else "").strip().splitlines()
    reason = (lines[0] if lines else type(exc.orig).__name__)[:200]
    log.warning("database refused a value from a request: %s", reason)
    log.debug("refused statement: %s", exc.statement)
    return JSONResponse(status_code=422, content=error_json("request", f"a value the database refuses: {reason}"))


def install(app: FastAPI) -> None:
    """Register the exception handlers that give every error the `ErrorBody` shape."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(sa_exc.OperationalError, _unavailable)
    app.add_exception_handler(sa_exc.DataError, _data_error)
    app.add_exception_handler(redis.ConnectionError, _unavailable)
    app.add_exception_handler(redis.TimeoutError, _unavailable)
