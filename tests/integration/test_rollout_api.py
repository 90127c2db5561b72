"""Rollout endpoints and domain rules: validation names the field, one active rollout (409 / Conflict even for
concurrent creates), operator token, control endpoints, JSON shape."""

from __future__ import annotations

import datetime as dt
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from pydantic import SecretStr

with warnings.catch_warnings():
    # starlette asks for `httpx2` (not a project dependency); its fallback to httpx works.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient
from rq import Queue
from sqlalchemy.orm import Session

from devtools.fakes import make_tiny_artifacts, seed_gallery
from service import events
from service import rollouts as domain
from service.api.errors import install as install_error_handlers
from service.api.rollouts import router
from service.config import Settings
from service.db import Rollout, make_engine, make_sessionmaker, queries
from service.redis_conn import make_redis
from worker import context, plan

pytestmark = pytest.mark.integration

TOKEN = "test-operator-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROLLOUT_KEYS = {
    "id",
    "from",
    "to",
    "mode",
    "policy",
    "status",
    "total",
    "done",
    "failed",
    "fraction",
    "items_per_second",
    "eta_seconds",
    "max_items_per_second",
    "batch_size",
    "created_at",
    "started_at",
    "updated_at",
    "finished_at",
    "error",
    "path",
    "training",
    "workers",
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_artifacts(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture
def s(settings: Settings, artifacts: dict[str, Path]) -> Settings:
    return settings.model_copy(
        update={
            "operator_token": SecretStr(TOKEN),
            "artifacts_dir": artifacts["v1"].parent,
            "metrics_port": 0,
        }
    )


@pytest.fixture
def db(s: Settings, artifacts: dict[str, Path]) -> Iterator[sa.orm.sessionmaker[Session]]:
    maker = make_sessionmaker(make_engine(s))
    with maker() as session:
        seed_gallery(session, artifacts, 40)
    yield maker


@pytest.fixture
def client(s: Settings, db: sa.orm.sessionmaker[Session]) -> Iterator[TestClient]:
    app = FastAPI()
    install_error_handlers(app)  # the app's handlers answer the domain's errors
    app.include_router(router)
    app.state.settings = s
    app.state.runtime = SimpleNamespace(settings=s, sessionmaker=db, redis=make_redis(s))
    with TestClient(app) as c:
        yield c


def _queued_ids(s: Settings) -> list[str]:
    return Queue(s.queue_name, connection=make_redis(s)).job_ids


def test_upgrade_returns_202_and_enqueues_the_plan(client: TestClient, s: Settings) -> None:
    pubsub = make_redis(s).pubsub()
    pubsub.subscribe(events.CHANNEL)
    r = client.post("/upgrade", json={"to": "v2", "mode": "forward", "policy": "fifo", "batch_size": 7}, headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    assert set(body) == ROLLOUT_KEYS
    assert body["from"] == "v1" and body["to"] == "v2" and body["mode"] == "forward" and body["policy"] == "fifo"
    assert body["status"] == "planning" and body["batch_size"] == 7 and body["total"] == 0
    created = dt.datetime.fromisoformat(body["created_at"])  # a UTC timestamp with its offset
    assert created.utcoffset() == dt.timedelta(0) and body["created_at"].endswith("+00:00")
    assert _queued_ids(s) == [domain.plan_job_id(body["id"])]
    msgs = [pubsub.get_message(timeout=1.0) for _ in range(2)]
    assert any(m and m["type"] == "message" and b'"rollout"' in m["data"] for m in msgs)

    again = client.post("/upgrade", json={"to": "v2"}, headers=AUTH)
    assert again.status_code == 409 and again.json()["detail"]["field"] == "rollout"

    context.configure(s)
    plan.plan_rollout(body["id"])
    got = client.get(f"/rollouts/{body['id']}").json()
    assert got["status"] == "running" and got["total"] == 40 and got["done"] == 0 and got["started_at"]
    assert domain.driver_job_id(body["id"], 0) in _queued_ids(s)
    listed = client.get("/rollouts").json()["rollouts"]
    assert [x["id"] for x in listed] == [body["id"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": "v9"}, "to"),
        ({"to": "v1"}, "to"),
        ({}, "to"),
        ({"to": "v2", "mode": "sideways"}, "mode"),
        ({"to": "v2", "policy": "oracle"}, "policy"),
        ({"to": "v2", "batch_size": 0}, "batch_size"),
        ({"to": "v2", "batch_size": "many"}, "batch_size"),
        ({"to": "v2", "max_items_per_second": -3}, "max_items_per_second"),
        ({"to": "v2", "colour": "red"}, "colour"),
    ],
)
def test_upgrade_validation_names_the_field(client: TestClient, body: dict[str, Any], field: str) -> None:
    r = client.post("/upgrade", json=body, headers=AUTH)
    assert 400 <= r.status_code < 500 and r.status_code != 409, r.text
    assert field in r.text
    assert client.get("/rollouts").json()["rollouts"] == []


def test_missing_compat_pack_starts_a_training_phase(
    client: TestClient, db: sa.orm.sessionmaker[Session], s: Settings
) -> None:
    from service.db import CompatPack

    with db() as session:
        session.execute(sa.delete(CompatPack))
        session.commit()
    r = client.post("/upgrade", json={"to": "v2"}, headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "training" and body["mode"] == "old-only" and body["training"]["sample_done"] == 0
    assert _queued_ids(s) == [domain.train_job_id(body["id"])]


def test_mutations_need_the_operator_token(client: TestClient) -> None:
    assert client.post("/upgrade", json={"to": "v2"}).status_code == 401
    assert client.post("/upgrade", json={"to": "v2"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    rid = client.post("/upgrade", json={"to": "v2"}, headers=AUTH).json()["id"]
    for path in ("pause", "resume", "abort"):
        assert client.post(f"/rollouts/{rid}/{path}").status_code == 401
    assert client.patch(f"/rollouts/{rid}", json={"max_items_per_second": 5}).status_code == 401
    assert client.get(f"/rollouts/{rid}").status_code == 200  # reads are open


def test_control_endpoints(client: TestClient, s: Settings) -> None:
    rid = client.post("/upgrade", json={"to": "v2", "policy": "random"}, headers=AUTH).json()["id"]
    context.configure(s)
    plan.plan_rollout(rid)

    r = client.patch(f"/rollouts/{rid}", json={"max_items_per_second": 12.5}, headers=AUTH)
    assert r.status_code == 200 and r.json()["max_items_per_second"] == 12.5
    bad = client.patch(f"/rollouts/{rid}", json={"max_items_per_second": 0}, headers=AUTH)
    assert bad.status_code == 422 and "max_items_per_second" in bad.text
    assert (
        client.patch(f"/rollouts/{rid}", json={"max_items_per_second": None}, headers=AUTH).json()[
            "max_items_per_second"
        ]
        is None
    )

    assert client.post(f"/rollouts/{rid}/pause", headers=AUTH).json()["status"] == "paused"
    assert client.post(f"/rollouts/{rid}/pause", headers=AUTH).json()["status"] == "paused"  # idempotent
    Queue(s.queue_name, connection=make_redis(s)).empty()
    assert client.post(f"/rollouts/{rid}/resume", headers=AUTH).json()["status"] == "running"
    assert domain.driver_job_id(rid, 0) in _queued_ids(s)  # resume re-enqueues the driver

    aborted = client.post(f"/rollouts/{rid}/abort", json={"purge": True}, headers=AUTH)
    assert aborted.status_code == 200 and aborted.json()["status"] == "aborted" and aborted.json()["finished_at"]
    conflict = client.post(f"/rollouts/{rid}/resume", headers=AUTH)
    assert conflict.status_code == 409 and conflict.json()["detail"]["field"] == "status"
    assert client.post(f"/rollouts/{rid}/abort", headers=AUTH).status_code == 409

    assert client.get("/rollouts/9999").status_code == 404
    assert client.get("/rollouts/0").status_code == 422
    assert client.post("/rollouts/9999/pause", headers=AUTH).status_code == 404
    # After an abort a new rollout can start.
    assert client.post("/upgrade", json={"to": "v2"}, headers=AUTH).status_code == 202


def test_concurrent_creates_give_one_success_one_conflict(s: Settings, db: sa.orm.sessionmaker[Session]) -> None:
    for _round in range(5):
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def create(barrier: threading.Barrier = barrier, outcomes: list[str] = outcomes) -> None:
            with db() as session:
                barrier.wait()
                try:
                    domain.create_rollout(session, s, to="v2")
                    outcomes.append("ok")
                except domain.Conflict:
                    outcomes.append("conflict")

        threads = [threading.Thread(target=create) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["conflict", "ok"]
        with db() as session:
            active = session.scalars(sa.select(Rollout).where(Rollout.active_lock == 1)).all()
            assert len(active) == 1
            domain.abort(session, active[0].id)


def test_unique_index_is_the_last_line_of_defence(s: Settings, db: sa.orm.sessionmaker[Session]) -> None:
    """Both creates pass the pre-check (it reads before either commits); the constraint decides."""
    a, b = db(), db()
    try:
        original = queries.active_rollout
        queries.active_rollout = lambda session: None
        try:
            domain.create_rollout(a, s, to="v2")
            with pytest.raises(domain.Conflict):
                domain.create_rollout(b, s, to="v2")
        finally:
            queries.active_rollout = original
    finally:
        a.close()
        b.close()


def test_viewing_an_ended_rollout_leaves_the_active_rollouts_gauges(
    client: TestClient, db: sa.orm.sessionmaker[Session]
) -> None:
    """GET /rollouts lists every rollout; only the active one may set the rollout gauges."""
    from service import metrics
    from service.db.models import BackfillTask, Item, Rollout

    with db() as session:
        old = Rollout(from_version="v1", to_version="v2", mode="reverse", policy="fifo", status="aborted", batch_size=7)
        session.add(old)
        session.flush()
        items = session.scalars(sa.select(Item.id).limit(5)).all()
        session.add_all(BackfillTask(rollout_id=old.id, item_id=i, priority=0.0, state="done") for i in items)
        session.commit()
    active = client.post("/upgrade", json={"to": "v2", "policy": "fifo"}, headers=AUTH).json()
    client.get(f"/rollouts/{active['id']}")
    total = metrics.ROLLOUT_TOTAL._value.get()  # type: ignore[attr-defined]
    assert total == active["total"] != 5
    assert [r["id"] for r in client.get("/rollouts").json()["rollouts"]][-1] == old.id  # the ended one comes last
    client.get(f"/rollouts/{old.id}")
    assert metrics.ROLLOUT_TOTAL._value.get() == total  # type: ignore[attr-defined]
