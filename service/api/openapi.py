"""The OpenAPI document, completed with what the route declarations cannot state by themselves.

- Bounds that come from the settings: `k` at most `max_k`, at most `max_batch_queries` queries per batch.
- How reads are guarded: with API keys configured every read takes `X-API-Key` or the operator token (two
  alternative security requirements); without keys the reads are open and declare no security and no 401.
- Links between operations (`POST /items` -> `GET`/`DELETE /items/{item_id}`, `POST /upgrade` -> every
  `/rollouts/{rollout_id}` operation), for clients and for schemathesis' stateful phase.

`install(app, settings)` replaces `app.openapi`; the document is built once, on first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from service.api.deps import require_api_key
from service.config import Settings

API_KEY_SCHEME = "ApiKey"
BEARER_SCHEME = "HTTPBearer"

ITEM_LINKS = {
    "GetItem": ("get", "/items/{item_id}"),
    "DeleteItem": ("delete", "/items/{item_id}"),
}
ROLLOUT_LINKS = {
    "GetRollout": ("get", "/rollouts/{rollout_id}"),
    "PatchRollout": ("patch", "/rollouts/{rollout_id}"),
    "PauseRollout": ("post", "/rollouts/{rollout_id}/pause"),
    "ResumeRollout": ("post", "/rollouts/{rollout_id}/resume"),
    "AbortRollout": ("post", "/rollouts/{rollout_id}/abort"),
    "RollbackRollout": ("post", "/rollouts/{rollout_id}/rollback"),
    "RolloutFailures": ("get", "/rollouts/{rollout_id}/failures"),
    "RetryFailed": ("post", "/rollouts/{rollout_id}/retry-failed"),
}


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if isinstance(op, dict) and "responses" in op:
                yield path, method, op


def _read_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(path, method) of every route guarded by `require_api_key` (directly or through its router)."""
    out: set[tuple[str, str]] = set()
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute) and any(d.call is require_api_key for d in route.dependant.dependencies):
            out.update((str(context.path_format), m.lower()) for m in context.methods or ())
    return out


def _read_security(schema: dict[str, Any], reads: set[tuple[str, str]], settings: Settings) -> None:
    for path, method, op in _operations(schema):
        if (path, method) not in reads:
            continue
        if settings.api_keys:
            op["security"] = [{API_KEY_SCHEME: []}, {BEARER_SCHEME: []}]
        else:
            op.pop("security", None)
            op["responses"].pop("401", None)
    if settings.api_keys:
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[API_KEY_SCHEME] = {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "One of the configured API keys (the operator token passes too).",
        }


def _settings_bounds(schema: dict[str, Any], settings: Settings) -> None:
    components = schema.get("components", {}).get("schemas", {})
    for name in ("SearchIn", "SearchBatchIn"):
        if (k := components.get(name, {}).get("properties", {}).get("k")) is not None:
            k["maximum"] = settings.max_k
    queries = components.get("SearchBatchIn", {}).get("properties", {}).get("queries")
    if queries is not None:
        queries["maxItems"] = settings.max_batch_queries


def _link(schema: dict[str, Any], source: tuple[str, str, str], targets: dict[str, tuple[str, str]], expr: str) -> None:
    """Links from the `source` (path, method, status) response to each target operation that exists."""
    path, method, status = source
    response = schema.get("paths", {}).get(path, {}).get(method, {}).get("responses", {}).get(status)
    if response is None:
        return
    links = response.setdefault("links", {})
    for name, (t_method, t_path) in targets.items():
        target = schema["paths"].get(t_path, {}).get(t_method)
        if target is None or "operationId" not in target:
            continue
        param = t_path.rsplit("{", 1)[1].split("}", 1)[0]
        links[name] = {"operationId": target["operationId"], "parameters": {param: expr}}


def complete(schema: dict[str, Any], app: FastAPI, settings: Settings) -> dict[str, Any]:
    """Add the settings' bounds, the read security and the links to FastAPI's document (in place)."""
    _settings_bounds(schema, settings)
    _read_security(schema, _read_routes(app), settings)
    # Every item of a 200 is live (created, existing or revived): the first one posted can be read and deleted.
    _link(schema, ("/items", "post", "200"), ITEM_LINKS, "$request.body#/items/0/id")
    _link(schema, ("/upgrade", "post", "202"), ROLLOUT_LINKS, "$response.body#/id")
    return schema


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the completed document at /openapi.json (and /docs)."""
    build = app.openapi

    completed: list[int] = []  # id() of the last document completed: FastAPI rebuilds it when routes change

    def openapi() -> dict[str, Any]:
        schema = build()
        if completed[-1:] != [id(schema)]:
            complete(schema, app, settings)
            completed.append(id(schema))
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
