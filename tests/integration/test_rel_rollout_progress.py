"""GET /rollouts counts progress for the whole page in one grouped query over the task table, not one scan
per rollout, and the counts it reports equal a count made independently in Python from the task rows.
Only the active rollout sets the rollout gauges."""

from __future__ import annotations

import datetime as dt
import random
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from devtools.fakes import make_tiny_artifacts, seed_gallery
from service import metrics
from service.api.app import create_app
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.db.models import BackfillTask, Rollout, utcnow

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

TOKEN = "progress-test-operator-token-0123"
STATES = ("pending", "leased", "done", "failed")


@pytest.fixture
def seeded(settings: Settings, tmp_path: Path) -> tuple[Settings, list[int]]:
    artifacts = make_tiny_artifacts(tmp_path / "artifacts")
    s = settings.model_copy(
        update={"artifacts_dir": tmp_path / "artifacts", "operator_token": SecretStr(TOKEN), "metrics_port": 0}
    )
    engine = make_engine(s)
    with make_sessionmaker(engine)() as session:
        item_ids = seed_gallery(session, artifacts, 30)
    engine.dispose()
    return s, item_ids


def _ended_rollouts(s: Settings, item_ids: list[int], n: int, seed: int = 0) -> None:
    """`n` ended rollouts with tasks in random states, some done within the last minute."""
    rng = random.Random(seed)
    now = utcnow()
    engine = make_engine(s)
    with make_sessionmaker(engine)() as session:
        for _ in range(n):
            r = Rollout(from_version="v1", to_version="v2", mode="forward", policy="fifo", status="aborted")
            r.batch_size = 5
            r.started_at = now - dt.timedelta(minutes=10)
            session.add(r)
            session.flush()
            for item in rng.sample(item_ids, rng.randint(0, len(item_ids))):
                state = rng.choice(STATES)
                done_at = now - dt.timedelta(seconds=rng.choice([5, 30, 600])) if state == "done" else None
                session.add(BackfillTask(rollout_id=r.id, item_id=item, priority=0.0, state=state, done_at=done_at))
        session.commit()
    engine.dispose()


def _expected(s: Settings) -> dict[int, dict[str, Any]]:
    """Per rollout, from the raw rows: counts per state and tasks done in the last 60 s."""
    engine = make_engine(s)
    now = utcnow()
    with make_sessionmaker(engine)() as session:
        rows = session.execute(sa.select(BackfillTask.rollout_id, BackfillTask.state, BackfillTask.done_at)).all()
    engine.dispose()
    out: dict[int, dict[str, Any]] = {}
    for rid, state, done_at in rows:
        e = out.setdefault(rid, {"states": Counter(), "recent": 0})
        e["states"][state] += 1
        e["recent"] += int(state == "done" and done_at is not None and (now - done_at).total_seconds() <= 60)
    return out


@pytest.fixture
def client(seeded: tuple[Settings, list[int]]) -> Iterator[TestClient]:
    with TestClient(create_app(seeded[0])) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        yield c


def _task_statements(client: TestClient, call: Any) -> tuple[Any, list[str]]:
    """Run `call()` and return its result and every SQL statement it sent that reads the task table."""
    seen: list[str] = []
    engine = client.app.state.runtime.engine  # type: ignore[attr-defined]

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "backfill_tasks" in statement:
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        return call(), seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def test_listing_counts_every_rollout_in_one_grouped_query(
    client: TestClient, seeded: tuple[Settings, list[int]]
) -> None:
    s, item_ids = seeded
    _ended_rollouts(s, item_ids, 12)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    active = client.post("/upgrade", json={"to": "v2", "policy": "fifo"}, headers=auth)
    assert active.status_code == 202, active.text
    response, statements = _task_statements(client, lambda: client.get("/rollouts"))
    assert response.status_code == 200, response.text
    listed = response.json()["rollouts"]
    assert len(listed) == 13
    assert len(statements) == 1, statements  # was 2 per rollout (26 here)
    expected = _expected(s)
    for r in listed:
        e = expected.get(r["id"], {"states": Counter(), "recent": 0})
        assert (r["total"], r["done"], r["failed"]) == (
            sum(e["states"].values()),
            e["states"]["done"],
            e["states"]["failed"],
        ), r["id"]
        assert r["items_per_second"] == pytest.approx(e["recent"] / 60, abs=1e-3), r["id"]
    # The gauges describe the active rollout (no tasks yet: planning), not the last one listed.
    assert metrics.ROLLOUT_TOTAL._value.get() == listed[0]["total"]  # type: ignore[attr-defined]
    assert listed[0]["id"] == active.json()["id"]
    # One rollout costs one statement over the task table too.
    one, statements = _task_statements(client, lambda: client.get(f"/rollouts/{listed[5]['id']}"))
    assert one.json()["total"] == listed[5]["total"] and len(statements) == 1, statements
