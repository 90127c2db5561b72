"""The lease contract of `worker/backfill.py`, checked function by function on a real database: `claim` (which
tasks, in which order, with which lease), `reap_orphans` (expired leases with no attempt left end `failed`),
`_fail` and `release` (attempts accounting), and the lease check of `commit_batch` (a batch commits only the
tasks it still holds).

Each test inserts its task rows, fixes the clock the worker reads (`backfill.utcnow`, so lease boundaries can
be hit exactly instead of slept for), calls one function and compares every row of the task table with an
expectation computed in Python from the rows it inserted. No RQ, no models, no sleeps: each test takes a
fraction of a second, so `scripts/mutation.py lease claim` can re-run them for every mutant. Postgres for all
of them; the claim tests also run on the embedded SQLite (its claim is a different statement)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import BackfillTask, Embedding, Item, ModelVersion, make_engine, make_sessionmaker
from service.db.models import Base, Rollout
from worker import backfill, pipeline
from worker.context import WorkerContext

pytestmark = pytest.mark.integration

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
MAX = 3  # max_attempts
LEASE = 30.0  # lease_seconds
S = dt.timedelta(seconds=1)
COLUMNS = ("rollout_id", "item_id", "priority", "state", "lease_expires_at", "leased_by", "attempts", "last_error")
COLUMNS_ALL = ("id", *COLUMNS, "updated_at", "done_at")
UNUSED_REDIS = "redis://127.0.0.1:1/0"  # never used by these functions; a call would fail (nothing listens)
UPDATED_BEFORE = T0 - 3600 * S  # every inserted row's updated_at: a write by the function under test shows


@dataclass
class World:
    ctx: WorkerContext
    maker: sessionmaker[Session]
    rollout: int  # the rollout under test (running)
    other: int  # another rollout (aborted): nothing here may touch its tasks
    items: list[int] = field(default_factory=list)
    clock: list[dt.datetime] = field(default_factory=lambda: [T0])
    fast: bool = False  # claim through the worker's Postgres pipeline statement (worker/pipeline.py)

    def tick(self, seconds: float) -> dt.datetime:
        self.clock[0] = self.clock[0] + dt.timedelta(seconds=seconds)
        return self.clock[0]


# "pipeline": Postgres, claims through the statement the worker's pipeline runs there (worker/pipeline.py
# `claim_rows`, which also reads the payloads); "postgres" and "sqlite": `worker.backfill.claim`.
BOTH = pytest.mark.parametrize("backend", ["postgres", "pipeline", "sqlite"])


@pytest.fixture(params=["postgres", "pipeline"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _settings(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    common: dict[str, Any] = {
        "redis_url": UNUSED_REDIS,
        "data_dir": tmp_path / "data",
        "max_attempts": MAX,
        "lease_seconds": LEASE,
    }
    if backend in ("postgres", "pipeline"):
        return Settings(database_url=request.getfixturevalue("pg"), **common)
    return Settings(**common)  # the embedded SQLite file under data_dir


@pytest.fixture
def world(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[World]:
    settings = _settings(backend, request, tmp_path)
    engine = make_engine(settings)
    if settings.is_sqlite:
        Base.metadata.create_all(engine)
    maker = make_sessionmaker(engine)
    ctx = WorkerContext(settings, maker, redis.Redis.from_url(UNUSED_REDIS), worker_id="host:42")
    with maker() as s:
        s.add_all(
            [
                ModelVersion(name=n, dim=4, artifact_path=n, checksum=n, status=st)
                for n, st in (("v1", "serving"), ("v2", "registered"))
            ]
        )
        items = [Item(external_id=f"x{i}", payload=b"p") for i in range(40)]
        s.add_all(items)
        roll = [
            Rollout(
                from_version="v1",
                to_version="v2",
                mode="forward",
                policy="fifo",
                status=st,
                batch_size=8,
                active_lock=lock,
                started_at=T0 - 60 * S,
            )
            for st, lock in (("running", 1), ("aborted", None))
        ]
        s.add_all(roll)
        s.commit()
        w = World(ctx, maker, roll[0].id, roll[1].id, [i.id for i in items], fast=backend == "pipeline")
    monkeypatch.setattr(backfill, "utcnow", lambda: w.clock[0])
    monkeypatch.setattr(pipeline, "utcnow", lambda: w.clock[0])
    yield w
    engine.dispose()


def insert_tasks(w: World, specs: list[dict[str, Any]]) -> list[int]:
    """Insert tasks (defaults: pending, priority 0, no lease, 0 attempts), one item each; returns their ids."""
    rows = []
    for n, spec in enumerate(specs):
        row = {
            "rollout_id": w.rollout,
            "item_id": w.items[n],
            "priority": 0.0,
            "state": "pending",
            "lease_expires_at": None,
            "leased_by": None,
            "attempts": 0,
            "last_error": None,
            "updated_at": UPDATED_BEFORE,
            "done_at": None,
        }
        row.update(spec)
        rows.append(row)
    with w.maker() as s:
        ids = [int(s.scalars(sa.insert(BackfillTask).values(**r).returning(BackfillTask.id)).one()) for r in rows]
        s.commit()
    return ids


def table(w: World) -> dict[int, dict[str, Any]]:
    """Every task row as it is in the database now (read in a fresh session: only committed state)."""
    t = BackfillTask.__table__
    with w.maker() as s:
        rows = s.execute(sa.select(*(t.c[c] for c in COLUMNS_ALL))).mappings().all()
    return {int(r["id"]): dict(r) for r in rows}


def leased(row: dict[str, Any], token: str, now: dt.datetime) -> dict[str, Any]:
    """What a claim at `now` under `token` makes of a row."""
    return {
        **row,
        "state": "leased",
        "leased_by": token,
        "lease_expires_at": now + dt.timedelta(seconds=LEASE),
        "attempts": row["attempts"] + 1,
        "updated_at": now,
    }


def reaped(row: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    reason = f"lease expired after {MAX} attempts: the worker holding it stopped (crash?)"
    prior = row["last_error"]
    return {
        **row,
        "state": "failed",
        "lease_expires_at": None,
        "last_error": reason if prior is None else f"{prior}; {reason}",
        "updated_at": now,
    }


def is_orphan(row: dict[str, Any], rollout: int, now: dt.datetime) -> bool:
    return (
        row["rollout_id"] == rollout
        and row["state"] == "leased"
        and row["lease_expires_at"] < now
        and row["attempts"] >= MAX
    )


def claimable(rows: dict[int, dict[str, Any]], rollout: int, now: dt.datetime) -> list[int]:
    """The reference: pending, or leased with an expired lease and attempts left; priority desc, then id."""
    ok = [
        i
        for i, r in rows.items()
        if r["rollout_id"] == rollout
        and (
            r["state"] == "pending" or (r["state"] == "leased" and r["lease_expires_at"] < now and r["attempts"] < MAX)
        )
    ]
    return sorted(ok, key=lambda i: (-rows[i]["priority"], i))


def claim(w: World, n: int) -> backfill.Claimed:
    with w.maker() as s:
        if w.fast:
            return pipeline.claim_rows(s, w.ctx, w.rollout, n)[0]
        return backfill.claim(s, w.ctx, w.rollout, n)


def expect_claim(w: World, before: dict[int, dict[str, Any]], got: backfill.Claimed, n: int) -> None:
    """`got` is the reference's first `n` claimable tasks after reaping, and the table is exactly `before`
    with those leased under `got.token` and the orphans reaped."""
    now = w.clock[0]
    after_reap = {i: reaped(r, now) if is_orphan(r, w.rollout, now) else r for i, r in before.items()}
    want = claimable(after_reap, w.rollout, now)[:n]
    assert got.tasks == {i: before[i]["item_id"] for i in want}
    expected = {i: leased(r, got.token, now) if i in want else r for i, r in after_reap.items()}
    assert table(w) == expected


@BOTH
def test_claim_takes_the_claimable_tasks_by_priority_and_reaps_orphans(world: World) -> None:
    w, now = world, T0
    ids = insert_tasks(
        w,
        [
            {"priority": 5.0},  # pending
            {"priority": 9.0, "attempts": 1},  # pending after a failed attempt
            {"priority": 5.0},  # same priority as the first: id order
            {"priority": 7.0, "state": "leased", "lease_expires_at": now - S, "attempts": 1, "leased_by": "dead:1"},
            {"priority": 10.0, "state": "leased", "lease_expires_at": now - S, "attempts": MAX, "leased_by": "d:2"},
            {
                "priority": 11.0,
                "state": "leased",
                "lease_expires_at": now - S,
                "attempts": MAX + 1,
                "last_error": "boom",
                "leased_by": "d:3",
            },
            {"priority": 8.0, "state": "leased", "lease_expires_at": now + 10 * S, "attempts": 1, "leased_by": "a:1"},
            {"priority": 6.0, "state": "leased", "lease_expires_at": now, "attempts": 1, "leased_by": "a:2"},
            {"priority": 12.0, "state": "leased", "lease_expires_at": now, "attempts": MAX, "leased_by": "a:3"},
            {"priority": 20.0, "state": "done", "attempts": 1, "done_at": now - S},
            {"priority": 20.0, "state": "failed", "attempts": MAX, "last_error": "bad"},
            {"priority": 1.0},
            {"priority": 0.5, "state": "leased", "lease_expires_at": now - S, "attempts": MAX - 1, "leased_by": "d:4"},
            {"priority": 100.0, "rollout_id": w.other},
            {
                "priority": 100.0,
                "rollout_id": w.other,
                "state": "leased",
                "lease_expires_at": now - S,
                "attempts": MAX,
                "leased_by": "d:5",
            },
            # Ended tasks with a stale lease (no code path leaves one, but a claim must not rely on it).
            {"priority": 30.0, "state": "done", "attempts": 1, "lease_expires_at": now - S, "leased_by": "d:6"},
            {"priority": 30.0, "state": "failed", "attempts": 1, "lease_expires_at": now - S, "leased_by": "d:7"},
        ],
    )
    before = table(w)
    first = claim(w, 3)  # the cut falls between two tasks of priority 5: the lower id is taken
    assert set(first.tasks) == {ids[1], ids[3], ids[0]}  # the reference's answer, spelled out once
    expect_claim(w, before, first, 3)
    assert first.token.startswith("host:42:") and len(first.token.split(":")[-1]) == 12
    int(first.token.split(":")[-1], 16)  # hex

    w.tick(0.5)
    before = table(w)
    second = claim(w, 10)
    assert set(second.tasks) == {ids[2], ids[7], ids[11], ids[12]}  # ids[7]: its lease ended at T0
    expect_claim(w, before, second, 10)
    assert second.token != first.token

    before = table(w)
    third = claim(w, 10)
    assert third.tasks == {} and table(w) == before
    assert third.token.startswith("host:42:") and third.token not in (first.token, second.token)


def test_ties_in_priority_are_claimed_in_id_order(world: World) -> None:
    """Whatever order the rows lie in: the lower ids are rewritten through an indexed column (no HOT update), so
    both a table scan and the claim index meet them last."""
    w = world
    ids = insert_tasks(w, [{"priority": 1.0} for _ in range(20)])
    with w.maker() as s:
        for p in (2.0, 1.0):
            s.execute(sa.update(BackfillTask).where(BackfillTask.id.in_(ids[:10])).values(priority=p))
        s.commit()
    before = table(w)
    got = claim(w, 5)
    assert set(got.tasks) == set(ids[:5])
    expect_claim(w, before, got, 5)


def test_a_claim_skips_the_rows_another_claim_is_locking(world: World) -> None:
    """Postgres: a row locked by a claim in progress is skipped (SKIP LOCKED), not waited for."""
    w = world
    ids = insert_tasks(w, [{"priority": float(10 - i)} for i in range(6)])
    with w.maker() as other:
        other.execute(sa.select(BackfillTask.id).where(BackfillTask.id.in_(ids[:2])).with_for_update())
        before = table(w)
        with w.maker() as s:
            s.execute(sa.text("SET LOCAL lock_timeout = '2s'"))  # a claim that waits fails instead of hanging
            got = backfill.claim(s, w.ctx, w.rollout, 3)
        assert set(got.tasks) == set(ids[2:5])
        other.rollback()
    want = {i: leased(r, got.token, T0) if i in ids[2:5] else r for i, r in before.items()}
    assert table(w) == want


@BOTH
def test_a_claim_never_takes_more_than_n_and_zero_takes_nothing(world: World) -> None:
    w = world
    insert_tasks(w, [{"priority": float(p)} for p in (3, 1, 4, 1, 5, 9, 2, 6)])
    before = table(w)
    got = claim(w, 0)
    assert got.tasks == {} and table(w) == before
    got = claim(w, 3)
    assert len(got.tasks) == 3
    expect_claim(w, before, got, 3)


@BOTH
def test_an_expired_lease_is_taken_over_only_after_its_end(world: World) -> None:
    """A lease that ends at T0 + LEASE is held until then (`<`, not `<=`), and claimable right after; the new
    claim has a new token and one more attempt, and the stale holder can no longer commit or release it."""
    w = world
    ids = insert_tasks(w, [{"priority": 1.0}])
    held = claim(w, 1)
    assert set(held.tasks) == {ids[0]}
    w.tick(LEASE)  # now == the lease's end: still held
    assert claim(w, 1).tasks == {}
    w.tick(1e-6)  # one microsecond later: expired
    before = table(w)
    again = claim(w, 1)
    expect_claim(w, before, again, 1)
    assert table(w)[ids[0]]["attempts"] == 2 and again.token != held.token
    before = table(w)
    backfill.release(w.ctx, held)  # the stale holder gives it back: no effect
    assert table(w) == before


def test_the_reaper_ends_exactly_the_orphans_of_its_rollout(world: World) -> None:
    w, now = world, T0
    insert_tasks(
        w,
        [
            {"state": "leased", "lease_expires_at": now - S, "attempts": MAX, "leased_by": "d:1"},
            {
                "state": "leased",
                "lease_expires_at": now - S,
                "attempts": MAX + 2,
                "leased_by": "d:2",
                "last_error": "oom?",
            },
            {"state": "leased", "lease_expires_at": now - S, "attempts": MAX - 1, "leased_by": "d:3"},
            {"state": "leased", "lease_expires_at": now, "attempts": MAX, "leased_by": "a:1"},
            {"state": "leased", "lease_expires_at": now + S, "attempts": MAX, "leased_by": "a:2"},
            {"state": "pending", "attempts": MAX},
            {"state": "done", "attempts": MAX, "lease_expires_at": now - S},
            {"state": "failed", "attempts": MAX, "lease_expires_at": now - S, "last_error": "x"},
            {
                "state": "leased",
                "lease_expires_at": now - S,
                "attempts": MAX,
                "leased_by": "d:4",
                "rollout_id": w.other,
            },
        ],
    )
    before = table(w)
    orphans = [i for i, r in before.items() if is_orphan(r, w.rollout, now)]
    assert len(orphans) == 2
    with w.maker() as s:
        n = backfill.reap_orphans(s, w.ctx, w.rollout, now)
        s.commit()
    assert n == len(orphans)
    assert table(w) == {i: reaped(r, now) if i in orphans else r for i, r in before.items()}
    with w.maker() as s:  # nothing left to reap
        assert backfill.reap_orphans(s, w.ctx, w.rollout, now) == 0


def test_failed_attempts_go_back_to_pending_until_the_last(world: World) -> None:
    """`_fail`: a held task with attempts left returns to `pending`, one on its last attempt ends `failed`, the
    error is kept (2000 characters at most), and a task this claim no longer holds is left alone."""
    w = world
    ids = insert_tasks(w, [{"priority": 3.0}, {"priority": 2.0, "attempts": MAX - 1}, {"priority": 1.0}])
    mine = claim(w, 3)
    assert set(mine.tasks) == set(ids)
    # The third task's lease expired (set in the database, not slept for) and another worker took it over.
    with w.maker() as s:
        s.execute(sa.update(BackfillTask).where(BackfillTask.id == ids[2]).values(lease_expires_at=T0 - S))
        s.commit()
    theirs = claim(w, 3)
    assert set(theirs.tasks) == {ids[2]}
    w.tick(1)
    before = table(w)
    long = "E" * 2500
    errors = {ids[0]: "bad payload", ids[1]: long, ids[2]: "not mine any more"}
    with w.maker() as s:
        backfill._fail(s, w.ctx, mine.token, errors)
        s.commit()
    now = w.clock[0]
    want = dict(before)
    want[ids[0]] = {
        **before[ids[0]],
        "state": "pending",
        "lease_expires_at": None,
        "last_error": "bad payload",
        "updated_at": now,
    }
    want[ids[1]] = {
        **before[ids[1]],
        "state": "failed",
        "lease_expires_at": None,
        "last_error": long[:2000],
        "updated_at": now,
    }
    assert before[ids[1]]["attempts"] == MAX and before[ids[0]]["attempts"] == 1
    assert table(w) == want


def test_release_gives_back_only_what_this_claim_still_holds(world: World) -> None:
    w = world
    ids = insert_tasks(w, [{"priority": float(-i), "attempts": i % 2} for i in range(6)])
    first = claim(w, 3)
    second = claim(w, 3)
    assert set(first.tasks) == set(ids[:3]) and set(second.tasks) == set(ids[3:])
    with w.maker() as s:  # one of the first claim's tasks was finished meanwhile under its token
        s.execute(sa.update(BackfillTask).where(BackfillTask.id == ids[0]).values(state="done"))
        s.commit()
    w.tick(2)
    before = table(w)
    backfill.release(w.ctx, first)
    want = dict(before)
    for i in ids[1:3]:
        want[i] = {
            **before[i],
            "state": "pending",
            "lease_expires_at": None,
            "attempts": before[i]["attempts"] - 1,
            "updated_at": w.clock[0],
        }
    assert table(w) == want
    assert [want[i]["attempts"] for i in ids[1:3]] == [1, 0]  # as before the claim
    before = table(w)
    backfill.release(w.ctx, backfill.Claimed(second.token, {}))  # nothing claimed: nothing to give back
    assert table(w) == before


def v2_vectors(w: World) -> dict[int, bytes]:
    with w.maker() as s:
        rows = s.execute(sa.select(Embedding.item_id, Embedding.vector).where(Embedding.model_version == "v2"))
        return {int(i): bytes(v) for i, v in rows}


def set_status(w: World, status: str) -> None:
    with w.maker() as s:
        s.execute(sa.update(Rollout).where(Rollout.id == w.rollout).values(status=status))
        s.commit()


def commit(w: World, claimed: backfill.Claimed, vectors: dict[int, np.ndarray], errors: dict[int, str]) -> Any:
    with w.maker() as s:
        rollout = s.get(Rollout, w.rollout)
        assert rollout is not None
        return backfill.commit_batch(s, w.ctx, rollout, claimed, vectors, errors)


@pytest.mark.parametrize("status", ["running", "paused"])
def test_a_batch_commits_exactly_the_tasks_it_still_holds(world: World, status: str) -> None:
    w = world
    ids = insert_tasks(w, [{"priority": float(-i)} for i in range(6)])
    mine = claim(w, 6)
    assert set(mine.tasks) == set(ids)
    item = mine.tasks
    with w.maker() as s:  # ids[5]: its lease expired and another worker holds it now; ids[4]: item deleted
        s.execute(sa.update(BackfillTask).where(BackfillTask.id == ids[5]).values(lease_expires_at=T0 - S))
        s.execute(sa.update(Item).where(Item.id == item[ids[4]]).values(deleted_at=T0))
        s.commit()
    theirs = claim(w, 6)
    assert set(theirs.tasks) == {ids[5]}
    set_status(w, status)
    w.tick(3)
    before = table(w)
    rng = np.random.default_rng(7)
    vectors = {item[i]: rng.normal(size=4) for i in ids if i != ids[2]}  # float64: stored as float32
    errors = {ids[3]: "cannot decode"}
    res = commit(w, mine, vectors, errors)

    now = w.clock[0]
    done = {**{i: before[i] for i in (ids[0], ids[1], ids[2], ids[4])}}
    want = dict(before)
    for i, r in done.items():
        want[i] = {**r, "state": "done", "done_at": now, "lease_expires_at": None, "updated_at": now}
    want[ids[3]] = {
        **before[ids[3]],
        "state": "pending",
        "lease_expires_at": None,
        "last_error": "cannot decode",
        "updated_at": now,
    }
    assert table(w) == want
    expected_rows = {item[i]: np.asarray(vectors[item[i]], dtype="<f4").tobytes() for i in (ids[0], ids[1])}
    assert v2_vectors(w) == expected_rows
    assert (res.claimed, sorted(res.embedded), res.skipped, res.failed, res.lost_lease) == (
        6,
        sorted(expected_rows),
        2,  # the deleted item, the item without a vector
        1,
        1,
    )


@pytest.mark.parametrize("status", ["aborted", "completed", "failed"])
def test_a_batch_of_a_stopped_rollout_writes_nothing(world: World, status: str) -> None:
    w = world
    ids = insert_tasks(w, [{"priority": 1.0}, {"priority": 0.0}])
    mine = claim(w, 2)
    set_status(w, status)
    before = table(w)
    res = commit(w, mine, {mine.tasks[i]: np.ones(4) for i in ids[:1]}, {ids[1]: "x"})
    assert table(w) == before and v2_vectors(w) == {}
    assert (res.claimed, res.embedded, res.skipped, res.failed, res.lost_lease) == (2, [], 0, 0, 2)


def test_a_late_batch_leaves_the_tasks_the_reaper_ended_alone(world: World) -> None:
    """A worker too slow for its lease on the last attempt: the reaper ended its tasks `failed` (keeping its
    token in `leased_by`); its late commit must neither mark them done nor write their vectors nor fail
    them again."""
    w = world
    ids = insert_tasks(w, [{"priority": 2.0, "attempts": MAX - 1}, {"priority": 1.0, "attempts": MAX - 1}])
    slow = claim(w, 2)
    w.tick(LEASE + 1)
    assert claim(w, 2).tasks == {}  # reaps both
    before = table(w)
    assert [before[i]["state"] for i in ids] == ["failed", "failed"]
    assert {before[i]["leased_by"] for i in ids} == {slow.token}
    w.tick(1)
    res = commit(w, slow, {slow.tasks[ids[0]]: np.ones(4)}, {ids[1]: "late error"})
    assert table(w) == before and v2_vectors(w) == {}
    assert (res.embedded, res.lost_lease) == ([], 1)


def test_a_batch_whose_every_task_failed_commits_only_the_failures(world: World) -> None:
    w = world
    ids = insert_tasks(w, [{"priority": 2.0}, {"priority": 1.0, "attempts": MAX - 1}])
    mine = claim(w, 2)
    w.tick(1)
    before = table(w)
    res = commit(w, mine, {}, {ids[0]: "a", ids[1]: "b"})
    now = w.clock[0]
    common = {"lease_expires_at": None, "updated_at": now}
    assert table(w) == {
        ids[0]: {**before[ids[0]], **common, "state": "pending", "last_error": "a"},
        ids[1]: {**before[ids[1]], **common, "state": "failed", "last_error": "b"},
    }
    assert (res.claimed, res.embedded, res.skipped, res.failed, res.lost_lease) == (2, [], 0, 2, 0)


def test_a_batch_holds_the_rollout_row_until_it_commits(world: World) -> None:
    """Postgres: the commit holds a share lock on the rollout row, so an abort or a completion (FOR UPDATE)
    cannot interleave with it. Checked from another connection just before the batch's commit."""
    w = world
    insert_tasks(w, [{"priority": 1.0}])
    mine = claim(w, 1)
    refused: list[bool] = []

    def probe(_session: Session) -> None:
        with w.maker() as other:
            stmt = sa.select(Rollout.id).where(Rollout.id == w.rollout).with_for_update(nowait=True)
            try:
                other.execute(stmt)
                refused.append(False)
            except sa.exc.OperationalError:
                refused.append(True)
            other.rollback()

    with w.maker() as s:
        sa.event.listen(s, "before_commit", probe)
        rollout = s.get(Rollout, w.rollout)
        assert rollout is not None
        res = backfill.commit_batch(s, w.ctx, rollout, mine, {iid: np.ones(4) for iid in mine.tasks.values()}, {})
    assert refused == [True] and len(res.embedded) == 1
