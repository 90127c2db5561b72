"""A worker process SIGKILLed mid-batch: its leases expire, another worker process reclaims the items, the
rollout completes with no item lost and none embedded twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from devtools.fakes import embedding_counts, make_tiny_artifacts, seed_gallery
from service import rollouts as domain
from service.config import REPO_ROOT, Settings
from service.db import BackfillTask, make_engine, make_sessionmaker
from tests.helpers import wait_until
from worker import context, plan

pytestmark = pytest.mark.integration

LEASE = 2.0


def _spawn(settings: Settings, name: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "BACKFILL_DATABASE_URL": settings.sqlalchemy_url,
        "BACKFILL_REDIS_URL": str(settings.redis_url),
        "BACKFILL_ARTIFACTS_DIR": str(settings.artifacts_dir),
        "BACKFILL_DATA_DIR": str(settings.data_dir),
        "BACKFILL_LEASE_SECONDS": str(LEASE),
        "BACKFILL_METRICS_PORT": "0",
        "BACKFILL_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "worker", "--name", name, "--maintenance-seconds", "0.5"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_sigkilled_worker_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    artifacts = make_tiny_artifacts(tmp_path / "artifacts", slow_reps=100)  # a batch of 10 takes measurable time
    s = settings.model_copy(update={"artifacts_dir": tmp_path / "artifacts", "lease_seconds": LEASE})
    ctx = context.configure(s)
    session = make_sessionmaker(make_engine(s))()
    items = seed_gallery(session, artifacts, 100)
    rollout = domain.create_rollout(session, s, to="v2", policy="random", batch_size=10)
    plan.plan_rollout(rollout.id)  # enqueues the driver job; no worker runs yet

    victim = _spawn(s, "victim")
    survivor = None
    try:

        def victims_leases(q: Session) -> list[int]:
            held = sa.select(BackfillTask.id).where(
                BackfillTask.rollout_id == rollout.id,
                BackfillTask.state == "leased",
                BackfillTask.leased_by.like(f"%:{victim.pid}:%"),
            )
            return list(q.scalars(held))

        def victim_mid_batch() -> list[int]:
            """The victim's leased tasks, once it has done 20 (empty before: keep polling)."""
            assert victim.poll() is None, victim.stderr.read().decode() if victim.stderr else ""
            with ctx.sessionmaker() as q:
                return victims_leases(q) if domain.task_counts(q, rollout.id)["done"] >= 20 else []

        wait_until(victim_mid_batch, timeout=60, interval=0.005, message="victim never held a lease")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        with ctx.sessionmaker() as q:
            c = domain.task_counts(q, rollout.id)
            # What the victim still held when it died (it may have committed a batch after our poll).
            in_flight = victims_leases(q)
        assert in_flight and c["leased"] >= 1 and c["done"] < len(items)

        survivor = spawned = _spawn(s, "survivor")

        def completed() -> bool:
            assert spawned.poll() is None, spawned.stderr.read().decode() if spawned.stderr else ""
            return domain.get_rollout(session, rollout.id).status == "completed"

        wait_until(completed, timeout=60, interval=0.1, message="rollout did not complete after the kill")
    finally:
        for p in (victim, survivor):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    assert embedding_counts(session, "v2") == (len(items), len(items))  # 0 lost, 0 duplicates
    reclaimed = session.scalars(sa.select(BackfillTask).where(BackfillTask.id.in_(in_flight))).all()
    assert all(t.state == "done" and t.attempts == 2 for t in reclaimed)
    assert all(f":{survivor.pid}:" in (t.leased_by or "") for t in reclaimed)
    assert domain.task_counts(session, rollout.id) == {"pending": 0, "leased": 0, "done": 100, "failed": 0}
    session.close()
