"""Issue 20's HTTP additions against real Postgres + Redis: `GET /items` (pages, totals, `?model=`), a
rollout's failures and `retry-failed`, `POST /upgrade?dry_run=true`, and the no-worker warning."""

from __future__ import annotations

import base64
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from devtools.fakes import make_artifacts
from models.preprocess import encode_png
from service.api.app import create_app
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.db.models import Embedding, Item
from service.rollouts import refresh_progress_metrics
from worker import context, driver, plan

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer dev-operator-token"}


def pngs(n: int, seed: int = 0) -> list[bytes]:
    imgs = np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return [encode_png(im) for im in imgs]


@pytest.fixture
def api_settings(settings: Settings, tmp_path: Path) -> Settings:
    art = make_artifacts(tmp_path / "artifacts")
    return settings.model_copy(update={"artifacts_dir": art, "ingest_poll_seconds": 0.05, "max_attempts": 2})


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings)) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        yield c


def add(client: TestClient, images: list[bytes], prefix: str = "it") -> list[str]:
    ids = [f"{prefix}-{i:03d}" for i in range(len(images))]
    body = {"items": [{"id": i, "image_b64": base64.b64encode(b).decode()} for i, b in zip(ids, images, strict=True)]}
    r = client.post("/items", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    return ids


def all_pages(client: TestClient, **params: object) -> tuple[list[str], set[int]]:
    ids, totals, cursor = [], set(), None
    while True:
        r = client.get("/items", params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        ids += [it["id"] for it in body["items"]]
        totals.add(body["total"])
        cursor = body["next_cursor"]
        if cursor is None:
            return ids, totals


def test_items_are_listed_in_pages_with_a_total_and_counted_per_model(client: TestClient) -> None:
    ids = add(client, pngs(25))
    listed, totals = all_pages(client, limit=10)
    assert listed == ids and totals == {25}  # insertion order, nothing twice, nothing missed
    first = client.get("/items", params={"limit": 10}).json()
    assert len(first["items"]) == 10 and first["items"][0]["embeddings"] == ["v1"]
    assert client.delete(f"/items/{ids[3]}", headers=AUTH).status_code == 200
    listed, totals = all_pages(client, limit=7)
    assert listed == ids[:3] + ids[4:] and totals == {24}
    assert client.get("/items", params={"model": "v1"}).json()["total"] == 24
    assert client.get("/items", params={"model": "v2"}).json()["total"] == 0
    r = client.get("/items", params={"model": "nope"})
    assert r.status_code == 404 and r.json()["detail"]["field"] == "model"
    r = client.get("/items", params={"cursor": "bm90LWEtY3Vyc29y"})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "cursor"
    assert client.get("/items", params={"limit": 0}).status_code == 422


def poison(settings: Settings, ids: list[str], payload: bytes | list[bytes]) -> None:
    maker = make_sessionmaker(make_engine(settings))
    with maker() as s:
        for n, ext in enumerate(ids):
            value = payload[n] if isinstance(payload, list) else payload
            s.execute(sa.update(Item).where(Item.external_id == ext).values(payload=value))
        s.commit()


def test_poisoned_items_show_in_failures_and_retry_completes_the_rollout(
    client: TestClient, api_settings: Settings
) -> None:
    images = pngs(20, seed=1)
    ids = add(client, images)
    bad = [ids[2], ids[7], ids[11]]
    poison(api_settings, bad, b"\x89PNG but not really")
    r = client.post("/upgrade", json={"to": "v2", "policy": "fifo", "batch_size": 4}, headers=AUTH)
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    context.configure(api_settings)
    plan.plan_rollout(rid)
    assert driver.drive(context.get_context(), rid).outcome != "completed"
    assert client.get(f"/rollouts/{rid}").json()["status"] == "failed"

    page = client.get(f"/rollouts/{rid}/failures", params={"limit": 2}).json()
    assert page["total"] == 3 and page["reasons"] == {"invalid payload": 3}
    assert len(page["failures"]) == 2 and page["next_cursor"]
    rest = client.get(f"/rollouts/{rid}/failures", params={"cursor": page["next_cursor"]}).json()
    failed = [f["item_id"] for f in page["failures"] + rest["failures"]]
    assert sorted(failed) == sorted(bad) and rest["next_cursor"] is None
    assert all(f["attempts"] == 2 and f["last_error"].startswith("invalid payload") for f in page["failures"])
    with make_sessionmaker(make_engine(api_settings))() as s:  # what the API's progress loop runs
        refresh_progress_metrics(s)
    assert 'backfill_rollout_failed_items_by_reason{reason="invalid payload"} 3.0' in client.get("/metrics").text

    poison(api_settings, bad, [images[2], images[7], images[11]])  # the fix: the right bytes again
    r = client.post(f"/rollouts/{rid}/retry-failed", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["retried"] == 3 and r.json()["rollout"]["status"] == "running"
    assert driver.drive(context.get_context(), rid).outcome == "completed"
    body = client.get(f"/rollouts/{rid}").json()
    assert body["status"] == "completed" and body["done"] == 20 and body["failed"] == 0
    with make_sessionmaker(make_engine(api_settings))() as s:
        v2 = s.scalar(sa.select(sa.func.count()).where(Embedding.model_version == "v2"))
    assert v2 == 20
    assert client.get(f"/rollouts/{rid}/failures").json()["total"] == 0
    r = client.post(f"/rollouts/{rid}/retry-failed", headers=AUTH)
    assert r.status_code == 409 and r.json()["detail"]["field"] == "status"
    assert client.post("/rollouts/99/retry-failed", headers=AUTH).status_code == 404
    assert client.get("/rollouts/99/failures").status_code == 404


def test_dry_run_answers_without_starting_and_refuses_what_upgrade_refuses(client: TestClient) -> None:
    add(client, pngs(12, seed=2))
    r = client.post("/upgrade", params={"dry_run": "true"}, json={"to": "v2"}, headers=AUTH)
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["dry_run"] is True and p["from"] == "v1" and p["to"] == "v2" and p["items"] == 12
    assert (
        p["compat_pack"] == "found"
        and p["status"] == "planning"
        and p["mode"] in {"reverse", "forward", "two-pass", "old-only"}
    )
    assert p["eta_seconds"] is None  # no finished rollout has measured a rate yet
    assert client.get("/rollouts").json()["rollouts"] == []  # nothing was started
    r = client.post("/upgrade", params={"dry_run": "true"}, json={"to": "v9"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"]["field"] == "to"
    assert client.post("/upgrade", json={"to": "v2"}, headers=AUTH).status_code == 202
    r = client.post("/upgrade", params={"dry_run": "true"}, json={"to": "v2"}, headers=AUTH)
    assert r.status_code == 409 and r.json()["detail"]["field"] == "rollout"


def test_a_rollout_without_a_worker_says_so(client: TestClient) -> None:
    add(client, pngs(5, seed=3))
    assert client.post("/upgrade", json={"to": "v2"}, headers=AUTH).status_code == 202
    workers = client.get("/rollouts/1").json()["workers"]
    assert workers["registered"] == 0 and "no worker is registered" in workers["warning"]
    ready = client.get("/readyz")
    assert ready.status_code == 200 and "no worker is registered" in ready.json()["rollout"]
    assert client.post("/rollouts/1/abort", headers=AUTH).status_code == 200
    assert client.get("/rollouts/1").json()["workers"] is None
    assert "rollout" not in client.get("/readyz").json()
