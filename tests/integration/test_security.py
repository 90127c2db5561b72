"""Security checks: operator auth on every mutating route, no token in logs, a body size limit, no SQL
built from strings, and CORS closed unless origins are configured."""

from __future__ import annotations

import ast
import base64
import os
import re
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from devtools.fakes import make_artifacts
from models.preprocess import encode_png
from service.api.app import create_app
from service.config import REPO_ROOT, Settings
from tests.helpers import wait_until

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

TOKEN = "sec-test-operator-token-6f1d2a9c7b"
READ_ONLY_POSTS = {"/search", "/search/batch"}  # POSTs that read (open, or guarded by X-API-Key)


def _b64(seed: int = 0) -> str:
    img = np.random.default_rng(seed).integers(0, 256, size=(28, 28), dtype=np.uint8)
    return base64.b64encode(encode_png(img)).decode()


@pytest.fixture
def sec_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(
        update={
            "artifacts_dir": make_artifacts(tmp_path / "artifacts"),
            "operator_token": SecretStr(TOKEN),
            "ingest_poll_seconds": 0.05,
        }
    )


@pytest.fixture
def client(sec_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(sec_settings)) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        yield c


def mutating_routes(app: object) -> list[tuple[str, str]]:
    """(method, path) of every POST/PATCH/PUT/DELETE route of the app, except the read-only searches."""
    out = []

    def walk(routes: list[object], prefix: str) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)  # FastAPI >= 0.16x keeps included routers whole
            if inner is not None:
                walk(inner.routes, prefix + getattr(route.include_context, "prefix", ""))  # type: ignore[attr-defined]
                continue
            path = prefix + getattr(route, "path", "")
            methods = getattr(route, "methods", None) or set()
            out.extend((m, path) for m in sorted(methods & {"POST", "PATCH", "PUT", "DELETE"}))

    walk(app.routes, "")  # type: ignore[attr-defined]
    return [(m, p) for m, p in out if p not in READ_ONLY_POSTS]


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_mutating_route_requires_the_operator_token(client: TestClient) -> None:
    routes = mutating_routes(client.app)
    expected = {
        ("POST", "/items"),
        ("DELETE", "/items/{item_id}"),
        ("POST", "/upgrade"),
        ("POST", "/rollouts/{rollout_id}/pause"),
        ("POST", "/rollouts/{rollout_id}/resume"),
        ("POST", "/rollouts/{rollout_id}/abort"),
        ("POST", "/rollouts/{rollout_id}/rollback"),
        ("POST", "/models"),
        ("PATCH", "/rollouts/{rollout_id}"),
    }
    assert expected <= set(routes), routes
    bodies = {
        "/items": {"items": [{"id": "x", "image_b64": _b64()}]},
        "/upgrade": {"to": "v2"},
        "/rollouts/{rollout_id}": {"max_items_per_second": 5.0},
    }
    bad_headers = [
        {},
        {"Authorization": "Bearer wrong-token-0000000000"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},  # a prefix of the real token
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": TOKEN},  # no scheme
        {"Authorization": f"Basic {base64.b64encode(f'op:{TOKEN}'.encode()).decode()}"},
        {"Authorization": "Bearer "},
        {"X-API-Key": TOKEN},
    ]
    for method, path in routes:
        for body in (bodies.get(path), None):
            for headers in bad_headers:
                r = client.request(method, _concrete(path), json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                assert r.json()["detail"]["field"] == "Authorization"
                assert TOKEN not in r.text
    # Nothing was written by the refused calls.
    assert client.get("/items/x").status_code == 404
    assert client.get("/rollouts").json()["rollouts"] == []
    # With the token the same calls get past auth (to a 2xx or a domain 4xx, never 401).
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for method, path in routes:
        r = client.request(method, _concrete(path), json=bodies.get(path), headers=auth)
        assert r.status_code != 401 and r.status_code < 500, (method, path, r.status_code, r.text)


def test_token_is_compared_in_constant_time() -> None:
    src = (REPO_ROOT / "service/api/deps.py").read_text()
    assert "hmac.compare_digest" in src


def test_body_size_limit(sec_settings: Settings) -> None:
    s = sec_settings.model_copy(update={"max_body_bytes": 64 * 1024})
    with TestClient(create_app(s)) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        big = {"image_b64": "A" * (70 * 1024)}
        # Declared by Content-Length: refused before the body is read, whatever the route and auth.
        for method, path in [("POST", "/search"), ("POST", "/items"), ("POST", "/upgrade"), ("PATCH", "/rollouts/1")]:
            r = c.request(method, path, json=big)
            assert r.status_code == 413, (path, r.status_code)
            assert r.json()["detail"] == {"field": "body", "problem": "request body larger than 65536 bytes"}

        # Streamed without Content-Length (chunked): refused while reading.
        def chunks() -> Iterator[bytes]:
            yield b'{"image_b64": "'
            for _ in range(20):
                yield b"A" * 8192
            yield b'"}'

        r = c.post("/search", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        # Just under the limit still works.
        r = c.post("/search", json={"image_b64": _b64(), "k": 1})
        assert r.status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_token_never_appears_in_server_logs(sec_settings: Settings, tmp_path: Path) -> None:
    """A real `backfill serve` at DEBUG level: authenticated and refused calls, then grep its output."""
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {
        **os.environ,
        "BACKFILL_DATABASE_URL": str(sec_settings.database_url),
        "BACKFILL_REDIS_URL": str(sec_settings.redis_url),
        "BACKFILL_ARTIFACTS_DIR": str(sec_settings.artifacts_dir),
        "BACKFILL_DATA_DIR": str(tmp_path / "data"),
        "BACKFILL_OPERATOR_TOKEN": TOKEN,
        "BACKFILL_LOG_LEVEL": "DEBUG",
        "BACKFILL_INGEST_POLL_SECONDS": "0.1",
    }
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                assert proc.poll() is None, log_path.read_text()
                try:
                    return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(ready, timeout=60, interval=0.3, message=log_path.read_text)
            auth = {"Authorization": f"Bearer {TOKEN}"}
            with httpx.Client(base_url=base, timeout=30) as c:
                r = c.post("/items", json={"items": [{"id": "a", "image_b64": _b64()}]}, headers=auth)
                assert r.status_code == 200, r.text
                assert c.post("/upgrade", json={"to": "v2"}, headers=auth).status_code == 202
                rid = c.get("/rollouts").json()["rollouts"][0]["id"]
                assert c.patch(f"/rollouts/{rid}", json={"max_items_per_second": 3}, headers=auth).status_code == 200
                assert c.post(f"/rollouts/{rid}/abort", headers=auth).status_code == 200
                assert c.delete("/items/a", headers=auth).status_code == 200
                # Failures log too: a wrong token, a refused upgrade with the right token.
                assert c.post("/items", json={}, headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401
                assert c.post("/upgrade", json={"to": "nope"}, headers=auth).status_code in (404, 409, 422)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = log_path.read_text(errors="replace")
    assert '"POST /items HTTP/1.1" 200' in text and "DEBUG" in text, text[-3000:]  # logging did happen
    assert TOKEN not in text
    assert TOKEN[:12] not in text  # not even a prefix


def _sql_problems(path: Path) -> list[str]:
    """text()/execute()/exec_driver_sql() calls whose SQL is built at run time (f-string, %, +, .format),
    or text() over anything but a literal."""
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []

    def built(node: ast.AST) -> bool:
        if isinstance(node, ast.JoinedStr):
            return True
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
            return True
        return (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"format", "join", "replace"}
        )

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        arg = node.args[0]
        where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
        if name == "text":
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                problems.append(f"{where}: text() over a non-literal ({ast.unparse(arg)[:80]})")
        elif name in {"execute", "exec_driver_sql", "executemany"} and built(arg):
            problems.append(f"{where}: {name}() over SQL built at run time ({ast.unparse(arg)[:80]})")
    return problems


def test_no_sql_built_from_strings() -> None:
    files = sorted(p for d in ("service", "worker") for p in (REPO_ROOT / d).rglob("*.py"))
    assert len(files) > 10
    problems = [p for f in files for p in _sql_problems(f)]
    assert not problems, "\n".join(problems)
    # The checker itself catches the patterns it is meant to catch.
    probe = REPO_ROOT / "service" / "__sql_probe__.py"
    try:
        probe.write_text(
            "import sqlalchemy as sa\n"
            "def f(s, t, v):\n"
            "    s.execute(sa.text(f'select * from {t}'))\n"
            "    s.execute(sa.text('select * from %s' % t))\n"
            "    s.execute('delete from x where id = {}'.format(v))\n"
            "    s.execute(sa.text('select 1'))\n"
        )
        assert len(_sql_problems(probe)) == 3
    finally:
        probe.unlink()


def _preflight(c: TestClient, origin: str) -> httpx.Response:
    return c.options(
        "/items",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_closed_by_default(client: TestClient) -> None:
    r = _preflight(client, "https://evil.example")
    assert "access-control-allow-origin" not in r.headers
    assert r.status_code >= 400
    r = client.get("/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_open_only_for_configured_origins(sec_settings: Settings) -> None:
    s = sec_settings.model_copy(update={"cors_origins": ["https://ops.example"]})
    with TestClient(create_app(s)) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        r = _preflight(c, "https://ops.example")
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://ops.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        r = c.get("/models", headers={"Origin": "https://ops.example"})
        assert r.headers["access-control-allow-origin"] == "https://ops.example"
        r = _preflight(c, "https://evil.example")
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"
        assert "access-control-allow-origin" not in r.headers
        r = c.get("/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        assert r.headers.get("access-control-allow-credentials") is None


def test_every_read_needs_an_api_key_when_keys_are_set(sec_settings: Settings) -> None:
    """With BACKFILL_API_KEYS set, the reads (items, models, rollouts, search) answer 401 without a key;
    a key or the operator token (the CLI's) gets through; the probes stay open."""
    s = sec_settings.model_copy(update={"api_keys": ["reader-key-1"]})
    with TestClient(create_app(s)) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        reads = [("GET", "/items/x"), ("GET", "/models"), ("GET", "/rollouts"), ("GET", "/rollouts/1")]
        reads += [("POST", "/search")]
        body = {"image_b64": _b64()}
        for method, path in reads:
            kw = {"json": body} if method == "POST" else {}
            r = c.request(method, path, **kw)
            assert r.status_code == 401 and r.json()["detail"]["field"] == "X-API-Key", (path, r.text)
            for headers in ({"X-API-Key": "reader-key-1"}, {"Authorization": f"Bearer {TOKEN}"}):
                assert c.request(method, path, headers=headers, **kw).status_code != 401, (path, headers)
        for probe in ("/healthz", "/readyz"):
            assert c.get(probe).status_code == 200


class OperationalError(Exception):
    """Stands for the driver's error: its text carries a host and SQL."""


def test_readiness_and_models_publish_no_internals(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    follower = client.app.state.runtime.follower  # type: ignore[attr-defined]

    def failing_cycle() -> None:
        raise OperationalError("connection to server at 10.9.8.7 port 5432 failed: SELECT secret_col")

    # The follower's own loop records the failure (it clears it again after the next good cycle).
    monkeypatch.setattr(follower, "sync_once", failing_cycle)
    assert follower.sync_and_wait(10) and follower.last_error is not None
    body = client.get("/readyz").json()
    assert body["ingestion"] == "error: OperationalError"
    assert "10.9.8.7" not in str(body) and "secret_col" not in str(body)
    models = client.get("/models").json()
    assert models["models"] and all("/" not in m["artifact"] for m in models["models"] + models["compat_packs"])
    assert str(client.app.state.settings.artifacts_dir) not in str(models)  # type: ignore[attr-defined]
