"""The driver's three-thread pipeline (`worker.driver`, `worker.pipeline`) against real Postgres + Redis:
the vectors it writes equal an independent `Encoder.embed` of the stored payloads; its one-statement claim
picks what the claim rule says (computed here in Python) and reaps orphans; an error in the loader or the
committer thread is raised in the driver's thread; a crash mid-batch loses nothing and commits nothing twice."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from devtools.fakes import make_tiny_artifacts, seed_gallery
from models.artifacts import load_encoder
from models.preprocess import decode, encode_png
from service import rollouts as domain
from service.config import Settings
from service.db import BackfillTask, Embedding, Item
from service.db.models import utcnow
from worker import backfill, context, driver, pipeline, plan
from worker.stages import StageClock

pytestmark = pytest.mark.integration


class Crash(Exception):
    """Stands for the worker process dying at that point."""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_artifacts(tmp_path_factory.mktemp("artifacts"), slow_reps=2)


@dataclasses.dataclass
class Env:
    settings: Settings
    ctx: context.WorkerContext
    session: Session
    items: list[int]
    artifacts: dict[str, Path]


def make_env(settings: Settings, artifacts: dict[str, Path], n: int, **overrides: object) -> Env:
    s = settings.model_copy(update={"artifacts_dir": artifacts["v1"].parent, "metrics_port": 0, **overrides})
    ctx = context.configure(s)
    session = ctx.sessionmaker()
    return Env(s, ctx, session, seed_gallery(session, artifacts, n), artifacts)


@pytest.fixture
def env(settings: Settings, artifacts: dict[str, Path]) -> Iterator[Env]:
    e = make_env(settings, artifacts, 120)
    yield e
    e.session.close()


def start(env: Env, **kw: Any) -> int:
    rollout = domain.create_rollout(env.session, env.settings, to="v2", **kw)
    plan.plan_rollout(rollout.id)
    return rollout.id


def v2_rows(env: Env) -> dict[int, tuple[int, bytes]]:
    """item id -> (seq, vector) of every v2 embedding."""
    env.session.expire_all()
    rows = env.session.execute(
        sa.select(Embedding.item_id, Embedding.seq, Embedding.vector).where(Embedding.model_version == "v2")
    ).all()
    out = {int(i): (int(q), bytes(v)) for i, q, v in rows}
    assert len(out) == len(rows), "an item has two v2 vectors"
    return out


def assert_vectors_are_direct_embeddings(env: Env, rows: dict[int, tuple[int, bytes]]) -> None:
    """Every written vector equals the v2 encoder (loaded afresh) run on that item's stored payload alone."""
    enc = load_encoder(env.artifacts["v2"])
    payloads = dict(env.session.execute(sa.select(Item.id, Item.payload).where(Item.id.in_(list(rows)))).all())
    for iid, (_, vector) in rows.items():
        want = enc.embed([decode(payloads[iid])])[0]
        np.testing.assert_allclose(np.frombuffer(vector, "<f4"), want, atol=1e-5, err_msg=f"item {iid}")


def expire_leases(env: Env) -> None:
    env.session.execute(
        sa.update(BackfillTask)
        .where(BackfillTask.state == "leased")
        .values(lease_expires_at=utcnow() - dt.timedelta(seconds=1))
    )
    env.session.commit()


def test_written_vectors_equal_a_direct_embed_of_the_payloads(env: Env) -> None:
    rng = np.random.default_rng(3)
    odd = [encode_png(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)) for _ in range(3)]
    odd.append(encode_png(rng.integers(0, 256, size=(9, 50), dtype=np.uint8)))
    extra = [Item(external_id=f"odd-{k}", payload=p) for k, p in enumerate(odd)]  # other sizes, RGB: fitted
    env.session.add_all(extra)
    env.session.commit()
    rid = start(env, batch_size=16)
    env.ctx.stages = StageClock()
    summary = driver.drive(env.ctx, rid)
    stages = env.ctx.stages.snapshot()
    env.ctx.stages = None
    everything = set(env.items) | {it.id for it in extra}
    assert summary.outcome == "completed" and set(summary.embedded) == everything
    rows = v2_rows(env)
    assert set(rows) == everything
    assert_vectors_are_direct_embeddings(env, rows)
    assert {"claim", "decode", "encode", "commit", "write", "event"} <= set(stages)
    assert stages["encode"]["items"] == len(everything) and stages["decode"]["items"] == len(everything)
    for name in ("decode", "encode"):  # computing stages: their thread's CPU, never more than their wall
        assert 0 < stages[name]["cpu_seconds"] <= stages[name]["seconds"] + 1e-3


def test_claim_follows_the_claim_rule_and_reaps_orphans(env: Env) -> None:
    """Ties, expired leases with and without attempts left, live leases: compared with the rule in Python."""
    rid = start(env, batch_size=10)
    now = utcnow()
    tasks = env.session.scalars(sa.select(BackfillTask).where(BackfillTask.rollout_id == rid)).all()
    rng = np.random.default_rng(4)
    for k, t in enumerate(tasks):
        t.priority = float(rng.integers(0, 4))  # many ties: the id breaks them
        kind = k % 5
        if kind in (1, 2, 3):
            t.state, t.leased_by = "leased", "someone"
            t.lease_expires_at = now + dt.timedelta(seconds=60 if kind == 1 else -5)
            t.attempts = env.settings.max_attempts if kind == 3 else 1
    env.session.commit()
    expect_orphans = {t.id for k, t in enumerate(tasks) if k % 5 == 3}
    claimable = [t for k, t in enumerate(tasks) if k % 5 in (0, 2, 4)]
    expected = [t.id for t in sorted(claimable, key=lambda t: (-t.priority, t.id))]
    got: list[int] = []
    for _ in range(3):
        with env.ctx.sessionmaker() as s:
            claimed, rows = pipeline.claim_rows(s, env.ctx, rid, 10)
        assert rows is not None and {r[0] for r in rows} == set(claimed.tasks)
        assert all(p is not None and not deleted for _, _, p, deleted in rows)
        got += sorted(claimed.tasks, key=lambda tid: expected.index(tid))
    assert got == expected[:30]
    env.session.expire_all()
    reaped = env.session.scalars(sa.select(BackfillTask).where(BackfillTask.id.in_(expect_orphans))).all()
    assert {t.state for t in reaped} == {"failed"}
    assert all(t.last_error and "lease expired after" in t.last_error for t in reaped)


def test_a_loader_error_is_raised_in_the_driver_and_loses_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    rid = start(env, batch_size=16)
    calls, real = itertools.count(), pipeline.claim_rows
    threads: list[str] = []

    def flaky(session: Session, ctx: context.WorkerContext, rollout_id: int, n: int) -> Any:
        threads.append(threading.current_thread().name)
        if next(calls) == 3:
            raise RuntimeError("database went away")
        return real(session, ctx, rollout_id, n)

    monkeypatch.setattr(pipeline, "claim_rows", flaky)
    committed: list[backfill.BatchResult] = []
    with pytest.raises(RuntimeError, match="database went away"):
        driver.drive(env.ctx, rid, on_batch=committed.append)
    assert threads[3].startswith("backfill-load-"), threads  # it failed on the loader thread
    # The three batches encoded before it were committed, and reported; nothing is left leased.
    written = {i for res in committed for i in res.embedded}
    assert len(written) == 48 and set(v2_rows(env)) == written
    assert domain.task_counts(env.session, rid) == {"pending": 72, "leased": 0, "done": 48, "failed": 0}
    monkeypatch.setattr(pipeline, "claim_rows", real)
    assert driver.drive(env.ctx, rid).outcome == "completed"
    assert set(v2_rows(env)) == set(env.items)
    assert env.session.scalar(sa.select(sa.func.max(BackfillTask.attempts))) == 1


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_mid_batch_loses_nothing_and_commits_nothing_twice(
    env: Env, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The committer dies on the third batch, before its transaction commits or right after (before the
    driver hears of it). A restarted driver finishes: every item has exactly one v2 vector, the committed
    ones were not written again, and all vectors equal a direct embed."""
    rid = start(env, batch_size=16)
    calls, real = itertools.count(), backfill.commit_batch

    def crashing(session: Session, *args: Any) -> backfill.BatchResult:
        k = next(calls)
        if k == 2 and when == "before":
            raise Crash("killed before COMMIT")
        res = real(session, *args)
        if k == 2:
            raise Crash("killed after COMMIT")
        return res

    monkeypatch.setattr(backfill, "commit_batch", crashing)
    with pytest.raises(Crash):
        driver.drive(env.ctx, rid)
    monkeypatch.setattr(backfill, "commit_batch", real)
    before = v2_rows(env)
    assert len(before) == (32 if when == "before" else 48)
    counts = domain.task_counts(env.session, rid)
    assert counts["done"] == len(before) and counts["failed"] == 0
    # Only the dead batch holds a lease (the next, encoded, and the prefetched one are given back).
    assert counts["leased"] == (16 if when == "before" else 0)
    expire_leases(env)
    healthy = dataclasses.replace(env.ctx, settings=env.settings.model_copy(update={"lease_seconds": 60.0}))
    assert driver.drive(healthy, rid).outcome == "completed"
    after = v2_rows(env)
    assert set(after) == set(env.items)
    assert all(after[i] == before[i] for i in before), "a committed vector was written again"
    assert_vectors_are_direct_embeddings(env, after)
    attempts = dict(env.session.execute(sa.select(BackfillTask.item_id, BackfillTask.attempts)).all())
    assert {attempts[i] for i in before} == {1}


def test_a_commit_error_is_raised_after_the_prefetched_batch_is_given_back(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid = start(env, batch_size=16)

    def broken(*args: Any) -> backfill.BatchResult:
        raise Crash("commit failed")

    monkeypatch.setattr(backfill, "commit_batch", broken)
    with pytest.raises(Crash, match="commit failed"):
        driver.drive(env.ctx, rid)
    counts = domain.task_counts(env.session, rid)
    assert counts["done"] == 0 and counts["leased"] == 16  # only the batch whose commit died holds a lease
    assert not [t for t in threading.enumerate() if t.name.startswith(("backfill-load-", "backfill-commit-"))]
