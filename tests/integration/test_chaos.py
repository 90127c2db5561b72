"""A reduced chaos run (devtools/chaos/) for CI: worker SIGKILLs, an API restart, a Redis FLUSHDB and an 8 s
database outage during a rollout on the test Postgres database, a client searching and two writers adding
items all along, and after completion an API restart right after the retention sweep. The Postgres
server is not stopped here (other tests share it): the API and worker reach it through a TCP proxy that the
run cuts. The full script stops the real server.

Asserted (by the script's own checks): the rollout completes, v2 embeddings == live items, no task left
pending/leased, every search 2xx, the restarted API answers a fixed query set identically, every item a
writer got a 200 for finds itself through /search on both APIs, and once the sweep has deleted every v1
vector a restarted API finds every live item by its own image from its first 200 on /readyz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from devtools import chaos
from service.config import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(240)
def test_rollout_survives_worker_kills_api_restart_redis_flush_and_db_outage(
    settings: Settings, tmp_path: Path
) -> None:
    cfg = chaos.Config(
        items=400,
        kills=4,
        api_restarts=1,
        redis_flush=True,
        pg_stop_seconds=8.0,
        db_outage="proxy",  # a TCP proxy in front of the shared server is cut; the server itself keeps running
        chaos_seconds=30.0,
        batch_size=40,
        slow_reps=20,
        compare_queries=10,
        complete_timeout=120.0,
        tiny=True,
        writers=2,
        write_batch=2,
        write_interval=0.5,
        sweep_restart=True,
    )
    stack = chaos.Stack(str(settings.database_url), str(settings.redis_url), tmp_path, tmp_path)
    summary = chaos.run(cfg, stack, out=tmp_path / "chaos")
    print("\n" + chaos.table(summary))
    assert summary.ok, summary.problems
    assert summary.rollout_status == "completed" and summary.active_through_chaos
    assert summary.worker_kills == 4 and summary.api_restarts == 1 and summary.redis_flushes == 1
    assert summary.pg_down_seconds >= 8.0 and summary.db_outage == "proxy"
    assert summary.rollout_reads.get("2xx", 0) > 0  # DB-backed reads: 2xx, or 503 during the outage only
    assert summary.restart_results_equal == [True]
    assert summary.written_items > 0 and summary.writes.get("200", 0) > 0
    assert summary.written_found == [summary.written_items] * 2  # on both APIs
    assert summary.v2_equals_live and summary.v2_rows == summary.live_items == 400 + summary.written_items
    assert summary.tasks["pending"] == summary.tasks["leased"] == summary.tasks["failed"] == 0
    assert summary.tasks["done"] >= 400  # items written before the plan's scan have tasks too
    sweep = summary.sweep_restart
    assert sweep["old_rows_left"] == 0 and sweep["found"] == sweep["live"] == summary.live_items
    assert summary.searches > 0 and summary.search_2xx == summary.searches
    assert (tmp_path / "chaos" / "summary.json").exists()


def test_database_and_redis_outages_answer_503_and_search_keeps_working(settings: Settings, tmp_path: Path) -> None:
    """Without stopping the shared servers: point one API process's DB sessions and Redis client at closed
    ports. Endpoints that need the database answer 503 + Retry-After naming it (not a 500); /search is served
    from memory and keeps answering 200; without Redis, writes still succeed and /readyz says 503."""
    import base64
    import warnings

    import redis
    import sqlalchemy as sa
    from sqlalchemy.orm import sessionmaker

    from devtools.fakes import make_artifacts
    from models.preprocess import encode_png
    from service.api.app import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    s = settings.model_copy(update={"artifacts_dir": make_artifacts(tmp_path / "artifacts")})
    auth = {"Authorization": "Bearer dev-operator-token"}
    img = base64.b64encode(encode_png(np.zeros((28, 28), np.uint8))).decode()
    with TestClient(create_app(s)) as c:
        runtime = c.app.state.runtime  # type: ignore[attr-defined]
        assert runtime.wait_ready(30)
        assert c.post("/items", json={"items": [{"id": "a", "image_b64": img}]}, headers=auth).status_code == 200
        good_sm, good_redis = runtime.sessionmaker, runtime.redis
        dead = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
        try:
            runtime.sessionmaker = sessionmaker(dead)
            for method, path, body in [
                ("GET", "/rollouts", None),
                ("GET", "/models", None),
                ("GET", "/items/a", None),
                ("POST", "/upgrade", {"to": "v2"}),
            ]:
                r = c.request(method, path, json=body, headers=auth)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.json()["detail"]["field"] == "database" and r.headers["retry-after"]
            r = c.post("/search", json={"image_b64": img, "k": 1})
            assert r.status_code == 200 and r.json()["results"][0]["id"] == "a"
            runtime.sessionmaker = good_sm
            runtime.redis = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
            # Redis only carries wake-up events and jobs: a gallery write still succeeds (followers poll).
            r = c.post("/items", json={"items": [{"id": "b", "image_b64": img}]}, headers=auth)
            assert r.status_code == 200 and r.json()["created"] == ["b"], r.text
            assert c.post("/search", json={"image_b64": img, "k": 1}).status_code == 200
            assert c.get("/readyz").status_code == 503
        finally:
            runtime.sessionmaker, runtime.redis = good_sm, good_redis
            dead.dispose()
        assert c.get("/readyz").status_code == 200
