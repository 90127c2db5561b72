"""Rollback after completion restores the previous model's answers exactly, from its retained vectors; and is
refused (409) when it cannot (not the newest upgrade, vectors missing). Postgres + Redis."""

from __future__ import annotations

import base64
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.fakes import make_artifacts
from models.data import load
from models.preprocess import encode_png
from service.api.app import create_app
from service.config import Settings
from worker import context, plan
from worker.main import build_worker

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer dev-operator-token"}
N = 60


def _b64(i: int) -> str:
    x, _ = load("digits", "test")
    return base64.b64encode(encode_png(x[i])).decode()


@pytest.fixture
def client(settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, context.WorkerContext]]:
    s = settings.model_copy(update={"artifacts_dir": make_artifacts(tmp_path / "art"), "ingest_poll_seconds": 0.05})
    ctx = context.configure(s)
    with TestClient(create_app(s)) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        items = [{"id": f"r-{i}", "image_b64": _b64(i)} for i in range(N)]
        assert c.post("/items", json={"items": items}, headers=AUTH).json()["searchable"]
        yield c, ctx


def _search(c: TestClient) -> list[list[tuple[str, float]]]:
    queries = [{"image_b64": _b64(-1 - i)} for i in range(8)]
    r = c.post("/search/batch", json={"queries": queries, "k": 10}, headers=AUTH)
    assert r.status_code == 200, r.text
    return [[(h["id"], h["distance"]) for h in row] for row in r.json()["results"]]


def _serving(c: TestClient, model: str, timeout: float = 20.0) -> None:
    rt = c.app.state.runtime  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ix = rt.manager.current
        if ix is not None and not ix.layout.in_rollout and ix.layout.serving == model and len(ix.new or ()) == N:
            return
        time.sleep(0.05)
    raise AssertionError(f"{model} never served alone")


def _complete(c: TestClient, ctx: context.WorkerContext) -> int:
    rid = int(c.post("/upgrade", json={"to": "v2", "mode": "reverse"}, headers=AUTH).json()["id"])
    plan.plan_rollout(rid)
    build_worker(ctx).work(burst=True)
    assert c.get(f"/rollouts/{rid}", headers=AUTH).json()["status"] == "completed"
    _serving(c, "v2")
    return rid


def test_rollback_restores_the_old_answers_exactly(client: tuple[TestClient, context.WorkerContext]) -> None:
    c, ctx = client
    before = _search(c)
    rid = _complete(c, ctx)
    assert _search(c) != before  # v2 answers now
    r = c.post(f"/rollouts/{rid}/rollback", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "rolled_back", r.text
    _serving(c, "v1")
    assert _search(c) == before  # same ids, same distances: v1's retained vectors, nothing re-encoded
    models = {m["name"]: m["status"] for m in c.get("/models", headers=AUTH).json()["models"]}
    assert models == {"v1": "serving", "v2": "registered"}
    again = c.post(f"/rollouts/{rid}/rollback", headers=AUTH)
    assert again.status_code == 409 and "only a completed one" in again.json()["detail"]["problem"]


def test_rollback_is_refused_when_an_item_has_no_old_vector(client: tuple[TestClient, context.WorkerContext]) -> None:
    c, ctx = client
    rid = _complete(c, ctx)
    late = {"items": [{"id": "late", "image_b64": _b64(300)}]}  # added with v2 serving: no v1 vector
    assert c.post("/items", json=late, headers=AUTH).status_code == 200
    r = c.post(f"/rollouts/{rid}/rollback", headers=AUTH)
    assert r.status_code == 409 and "1 live items have no v1 vector" in r.json()["detail"]["problem"], r.text
    assert c.get(f"/rollouts/{rid}", headers=AUTH).json()["status"] == "completed"  # nothing changed
    assert c.delete("/items/late", headers=AUTH).status_code == 200
    assert c.post(f"/rollouts/{rid}/rollback", headers=AUTH).status_code == 200  # possible again
    assert c.post("/rollouts/999/rollback", headers=AUTH).status_code == 404
