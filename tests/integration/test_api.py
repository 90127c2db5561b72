"""The HTTP contract against real Postgres + Redis, with tiny random artifacts."""

from __future__ import annotations

import base64
import gc
import io
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from devtools.fakes import make_artifacts
from models.preprocess import encode_png
from service.api.app import create_app
from service.config import Settings
from service.db.models import Embedding, Item, ModelVersion, Rollout

with warnings.catch_warnings():  # starlette asks for `httpx2`; httpx still works (pyproject is lead-owned)
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

TOKEN = "dev-operator-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def b64(img: np.ndarray) -> str:
    return base64.b64encode(encode_png(img)).decode()


@pytest.fixture
def api_settings(settings: Settings, tmp_path: Path) -> Settings:
    art = make_artifacts(tmp_path / "artifacts")
    return settings.model_copy(update={"artifacts_dir": art, "ingest_poll_seconds": 0.05, "max_k": 50})


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings)) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        yield c


def add(client: TestClient, imgs: np.ndarray, prefix: str = "item") -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(len(imgs))]
    r = client.post(
        "/items",
        json={
            "items": [
                {"id": i, "image_b64": b64(im), "label": n % 3} for n, (i, im) in enumerate(zip(ids, imgs, strict=True))
            ]
        },
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    assert r.json()["searchable"] is True
    return ids


def test_health_ready_models_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["indices"] == "ok"
    m = client.get("/models").json()
    assert {x["name"]: x["status"] for x in m["models"]} == {"v1": "serving", "v2": "registered"}
    assert [(p["from"], p["to"]) for p in m["compat_packs"]] == [("v1", "v2")]
    text = client.get("/metrics").text
    assert 'backfill_http_requests_total{route="/models",status="200"}' in text


def test_gallery_and_search_contract(client: TestClient) -> None:
    imgs = images(30)
    ids = add(client, imgs)
    # Idempotent on the external id.
    r = client.post("/items", json={"items": [{"id": ids[0], "image_b64": b64(imgs[0])}]}, headers=AUTH)
    assert r.json()["existing"] == [ids[0]] and r.json()["created"] == []
    r = client.post("/search", json={"image_b64": b64(imgs[3]), "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results", "serving"}
    assert body["serving"] == {"model": "v1", "rollout_id": None, "backfilled_fraction": 1.0, "mode": None}
    assert len(body["results"]) == 5
    assert body["results"][0]["id"] == ids[3] and body["results"][0]["distance"] < 1e-5
    assert all(set(h) == {"id", "distance", "source"} and h["source"] == "new" for h in body["results"])
    # Batch: results in query order.
    r = client.post("/search/batch", json={"queries": [{"image_b64": b64(imgs[i])} for i in (7, 2, 9)], "k": 3})
    assert r.status_code == 200
    assert [row[0]["id"] for row in r.json()["results"]] == [ids[7], ids[2], ids[9]]
    # NPY input works too.
    buf = io.BytesIO()
    np.save(buf, imgs[4])
    r = client.post("/search", json={"image_b64": base64.b64encode(buf.getvalue()).decode(), "k": 1})
    assert r.json()["results"][0]["id"] == ids[4]
    # Read and delete.
    item = client.get(f"/items/{ids[5]}").json()
    assert item["id"] == ids[5] and item["embeddings"] == ["v1"] and item["side"] == "new"
    assert client.delete(f"/items/{ids[5]}", headers=AUTH).status_code == 200
    assert client.get(f"/items/{ids[5]}").status_code == 404
    assert client.delete(f"/items/{ids[5]}", headers=AUTH).status_code == 404
    r = client.post("/search", json={"image_b64": b64(imgs[5]), "k": 50})
    assert ids[5] not in [h["id"] for h in r.json()["results"]]
    # Revive a deleted id: searchable again, once.
    add(client, imgs[5:6], prefix="x")  # unrelated item
    r = client.post("/items", json={"items": [{"id": ids[5], "image_b64": b64(imgs[5])}]}, headers=AUTH)
    assert r.json()["revived"] == [ids[5]]
    hits = [h["id"] for h in client.post("/search", json={"image_b64": b64(imgs[5]), "k": 50}).json()["results"]]
    assert hits.count(ids[5]) == 1


def _start_rollout(api_settings: Settings, mode: str) -> int:
    eng = sa.create_engine(str(api_settings.database_url))
    with eng.begin() as c:
        rid = c.execute(
            sa.insert(Rollout)
            .values(
                from_version="v1",
                to_version="v2",
                mode=mode,
                policy="fifo",
                status="running",
                batch_size=10,
                active_lock=1,
            )
            .returning(Rollout.id)
        ).scalar_one()
    eng.dispose()
    return int(rid)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_rollout_layout_old_new_and_completion(client: TestClient, api_settings: Settings, mode: str) -> None:
    runtime: Any = client.app.state.runtime  # type: ignore[attr-defined]
    imgs = images(40, seed=1)
    ids = add(client, imgs)
    rid = _start_rollout(api_settings, mode)
    assert runtime.follower.sync_and_wait(10)
    r = client.post("/search", json={"image_b64": b64(imgs[0]), "k": 40}).json()
    assert r["serving"] == {"model": "v2", "rollout_id": rid, "backfilled_fraction": 0.0, "mode": mode}
    assert {h["source"] for h in r["results"]} == {"old"} and len(r["results"]) == 40
    # Backfill half the items with v2 (what the worker does), as plain rows in the embeddings table.
    v2 = runtime.encoder("v2").embed(imgs[:20])
    eng = sa.create_engine(str(api_settings.database_url))
    with eng.begin() as c:
        item_ids = dict(c.execute(sa.select(Item.external_id, Item.id)).tuples().all())
        c.execute(
            sa.insert(Embedding),
            [
                {"item_id": item_ids[ids[i]], "model_version": "v2", "vector": v2[i].astype("<f4").tobytes()}
                for i in range(20)
            ],
        )
    assert runtime.follower.sync_and_wait(10)
    r = client.post("/search", json={"image_b64": b64(imgs[3]), "k": 40}).json()
    assert r["serving"]["backfilled_fraction"] == 0.5
    got = [h["id"] for h in r["results"]]
    assert sorted(got) == sorted(ids)  # every item exactly once across both sides
    assert r["results"][0] == {"id": ids[3], "distance": pytest.approx(0.0, abs=1e-5), "source": "new"}
    # A new item during the rollout is embedded with both models and lands in NEW at once. Each claim is
    # checked against something computed apart from GET /items: the request that was sent, the rows in
    # the database, the encoders run here, and what a search finds.
    during = images(1, seed=9)
    new_id = add(client, during, prefix="during")[0]
    item = client.get(f"/items/{new_id}").json()
    assert item["id"] == new_id and item["label"] == 0  # add() labels the n-th item n % 3
    assert item["payload_bytes"] == len(encode_png(during[0]))
    assert item["embeddings"] == ["v1", "v2"] and item["side"] == "new"
    with eng.connect() as c:
        rows = dict(
            c.execute(
                sa.select(Embedding.model_version, Embedding.vector)
                .join(Item, Item.id == Embedding.item_id)
                .where(Item.external_id == new_id)
            )
            .tuples()
            .all()
        )
    assert sorted(rows) == item["embeddings"]
    for name, vec in rows.items():
        want = runtime.encoder(name).embed(during)[0]
        np.testing.assert_allclose(np.frombuffer(vec, "<f4"), want, rtol=1e-5, atol=1e-6, err_msg=name)
    r = client.post("/search", json={"image_b64": b64(during[0]), "k": 3}).json()
    assert r["results"][0] == {"id": new_id, "distance": pytest.approx(0.0, abs=1e-5), "source": "new"}
    # Completion (the worker's transaction): v2 serving, one index of v2 vectors.
    with eng.begin() as c:
        rest = runtime.encoder("v2").embed(imgs[20:])
        c.execute(
            sa.insert(Embedding),
            [
                {
                    "item_id": item_ids[ids[20 + i]],
                    "model_version": "v2",
                    "vector": rest[i].astype("<f4").tobytes(),
                }
                for i in range(20)
            ],
        )
        c.execute(sa.update(Rollout).where(Rollout.id == rid).values(status="completed", active_lock=None))
        c.execute(sa.update(ModelVersion).where(ModelVersion.name == "v1").values(status="retired"))
        c.execute(sa.update(ModelVersion).where(ModelVersion.name == "v2").values(status="serving"))
    eng.dispose()
    assert runtime.follower.sync_and_wait(10)
    r = client.post("/search", json={"image_b64": b64(imgs[30]), "k": 50}).json()
    assert r["serving"] == {"model": "v2", "rollout_id": None, "backfilled_fraction": 1.0, "mode": None}
    assert len(r["results"]) == 41 and r["results"][0]["id"] == ids[30]
    assert {h["source"] for h in r["results"]} == {"new"}


def test_startup_heap_frozen_and_a_swapped_out_index_set_still_freed(api_settings: Settings) -> None:
    """The lifespan freezes the start-up heap out of the cyclic GC (the p99 under load); the indices built
    at start-up are frozen with it, and once a layout change swaps them out they must still be freed."""
    with TestClient(create_app(api_settings)) as c:
        runtime: Any = c.app.state.runtime  # type: ignore[attr-defined]
        assert runtime.wait_ready(30)
        assert gc.get_freeze_count() > 1000
        first = weakref.ref(runtime.manager.current)
        assert first() is not None
        add(c, images(4))
        _start_rollout(api_settings, "reverse")  # a layout change: a fresh IndexSet is built and swapped in
        assert runtime.follower.sync_and_wait(10)
        assert runtime.manager.current is not first() and runtime.manager.current.layout.in_rollout
        gc.collect()  # frozen objects are not collected: this passes only if reference counting freed it
        assert first() is None
    assert gc.get_freeze_count() == 0  # shutdown unfreezes


def test_auth(client: TestClient, api_settings: Settings) -> None:
    body = {"items": [{"id": "a", "image_b64": b64(images(1)[0])}]}
    for headers in ({}, {"Authorization": "Bearer wrong-token-123456"}, {"Authorization": TOKEN}):
        r = client.post("/items", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["detail"]["field"] == "Authorization"
        assert client.delete("/items/a", headers=headers).status_code == 401


def test_api_keys_guard_search(api_settings: Settings) -> None:
    s = api_settings.model_copy(update={"api_keys": ["key-1"]})
    with TestClient(create_app(s)) as c:
        c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        body = {"image_b64": b64(images(1)[0])}
        assert c.post("/search", json=body).status_code == 401
        assert c.post("/search", json=body, headers={"X-API-Key": "nope"}).status_code == 401
        assert c.post("/search", json=body, headers={"X-API-Key": "key-1"}).status_code == 200


@pytest.mark.parametrize(
    ("payload", "status", "field"),
    [
        ({"image_b64": b64(images(1)[0])[:-7], "k": 3}, 422, "image_b64"),  # truncated base64
        (
            {"image_b64": base64.b64encode(encode_png(images(1)[0])[:60]).decode()},
            422,
            "image_b64",
        ),  # cut PNG
        ({"image_b64": "not base64 at all!!"}, 422, "image_b64"),
        ({"image_b64": base64.b64encode(b"GIF89a....").decode()}, 422, "image_b64"),
        ({"image_b64": b64(images(1)[0]), "k": 0}, 422, "k"),
        ({"image_b64": b64(images(1)[0]), "k": 51}, 422, "k"),
        ({"image_b64": b64(images(1)[0]), "k": "many"}, 422, "k"),
        ({"k": 3}, 422, "image_b64"),
        ([1, 2], 422, "body"),
    ],
)
def test_bad_search_inputs_are_clear_4xx(client: TestClient, payload: Any, status: int, field: str) -> None:
    r = client.post("/search", json=payload)
    assert r.status_code == status, r.text
    assert r.json()["detail"]["field"] == field
    assert r.json()["detail"]["problem"]


def test_bad_shapes_and_sizes(client: TestClient) -> None:
    def npy(a: np.ndarray) -> str:
        buf = io.BytesIO()
        np.save(buf, a)
        return base64.b64encode(buf.getvalue()).decode()

    for bad in (np.zeros((3, 28, 28), np.uint8), np.zeros((28,), np.uint8), np.full((28, 28), 2.0)):
        r = client.post("/search", json={"image_b64": npy(bad)})
        assert r.status_code == 422 and r.json()["detail"]["field"] == "image_b64", r.text
    r = client.post("/search", json={"image_b64": npy(np.zeros((2000, 2000), np.uint8))})
    assert r.status_code == 413 or (r.status_code == 422 and "limit" in r.json()["detail"]["problem"])
    r = client.post(
        "/search",
        content=b'{"image_b64": "' + b"A" * (10 * 1024 * 1024) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["detail"]["field"] == "body"
    r = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/search/batch", json={"queries": [{"image_b64": b64(images(1)[0])}, {"image_b64": "@@"}]})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "queries[1].image_b64"
    r = client.post("/search/batch", json={"queries": []})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "queries"
    r = client.post("/items", json={"items": [{"id": "z", "image_b64": "%%%"}]}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"]["field"] == "items[0].image_b64"
    assert client.get("/items/unknown").status_code == 404
