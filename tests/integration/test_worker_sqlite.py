"""The embedded SQLite path (no SKIP LOCKED): two drivers share a rollout without overlap and it completes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from devtools.fakes import embedding_counts, make_tiny_artifacts, seed_gallery
from service import rollouts as domain
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.db.migrate import upgrade_head
from service.redis_conn import make_redis
from worker import context, driver, plan

pytestmark = pytest.mark.integration


def test_sqlite_rollout_with_two_drivers(redis_url: str, tmp_path: Path) -> None:
    artifacts = make_tiny_artifacts(tmp_path / "artifacts", slow_reps=2)
    s = Settings(data_dir=tmp_path / "data", redis_url=redis_url, artifacts_dir=tmp_path / "artifacts")
    upgrade_head(s)
    maker = make_sessionmaker(make_engine(s))
    with maker() as session:
        items = seed_gallery(session, artifacts, 80)
        rid = domain.create_rollout(session, s, to="v2", policy="uncertainty", batch_size=8).id
    context.configure(s)
    plan.plan_rollout(rid)
    contexts = [
        context.WorkerContext(s, make_sessionmaker(make_engine(s)), make_redis(s), worker_id=f"w{i}") for i in (0, 1)
    ]
    out: list[driver.DriveSummary] = []
    threads = [threading.Thread(target=lambda c=c: out.append(driver.drive(c, rid))) for c in contexts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    a, b = (set(x.embedded) for x in out)
    assert a.isdisjoint(b) and a | b == set(items)
    with maker() as session:
        assert domain.get_rollout(session, rid).status == "completed"
        assert embedding_counts(session, "v2") == (80, 80)
