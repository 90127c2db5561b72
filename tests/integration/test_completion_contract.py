"""The completion of a rollout (`service/rollouts.py` `complete`, `requeue_missing`, `task_counts`) and the
operator's transitions (`pause`, `resume`, `abort`), checked function by function on real Postgres.

Each test inserts the rows it needs (models, items, vectors, tasks, a rollout), fixes the clock the module
reads (`rollouts.utcnow`), calls one function and compares the rollout, the models, the tasks and the vectors
with an expectation computed in Python from what it inserted; it also checks that the rollout row's lock is
released when the call returns (another connection takes it with NOWAIT) and, where the call publishes, that
the event arrives over a real Redis. No RQ, no workers, no sleeps: `scripts/mutation.py rollouts transitions`
re-runs these for every mutant."""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
from collections.abc import Iterator, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from service import events
from service import rollouts as domain
from service.config import Settings
from service.db import BackfillTask, Embedding, Item, ModelVersion, make_engine, make_sessionmaker
from service.db.models import Rollout

pytestmark = pytest.mark.integration

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
EARLIER = T0 - dt.timedelta(hours=1)
MAX = 3
ROLLOUT_COLUMNS = ("status", "active_lock", "finished_at", "error", "started_at")
TASK_COLUMNS = ("id", "rollout_id", "item_id", "priority", "state", "attempts", "done_at", "updated_at")


@dataclass
class World:
    settings: Settings
    maker: sessionmaker[Session]
    rollout: int  # running, v1 -> v2, a large random id: events on the shared Redis server are told apart
    other: int  # an ended rollout with unfinished tasks, which must never count
    items: list[int] = field(default_factory=list)
    r: redis.Redis | None = None


@pytest.fixture
def world(pg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[World]:
    retention = getattr(request, "param", 7.0)
    settings = Settings(
        database_url=pg,
        redis_url="redis://127.0.0.1:1/0",  # not used: tests that check events pass their own client
        data_dir=tmp_path / "data",
        max_attempts=MAX,
        old_embedding_retention_days=retention,
    )
    engine = make_engine(settings)
    maker = make_sessionmaker(engine)
    rid = random.randrange(10**12, 2**62)
    with maker() as s:
        s.add_all(
            [
                ModelVersion(name=n, dim=2, artifact_path=n, checksum=n, status=st)
                for n, st in (("v0", "retired"), ("v1", "serving"), ("v2", "registered"), ("v3", "registered"))
            ]
        )
        items = [Item(external_id=f"x{i}", payload=b"p") for i in range(12)]
        s.add_all(items)
        s.add_all(
            [
                Rollout(
                    id=rid,
                    from_version="v1",
                    to_version="v2",
                    mode="forward",
                    policy="fifo",
                    status="running",
                    batch_size=8,
                    active_lock=1,
                    started_at=EARLIER,
                ),
                Rollout(
                    id=rid + 1,
                    from_version="v1",
                    to_version="v3",
                    mode="forward",
                    policy="fifo",
                    status="aborted",
                    batch_size=8,
                    active_lock=None,
                    started_at=EARLIER,
                    finished_at=EARLIER,
                ),
            ]
        )
        s.commit()
        w = World(settings, maker, rid, rid + 1, [i.id for i in items])
    monkeypatch.setattr(domain, "utcnow", lambda: T0)
    yield w
    engine.dispose()


def setup_rows(
    w: World,
    tasks: dict[int, str],
    v2: set[int] | None = None,
    deleted: Set[int] = frozenset(),
    priorities: dict[int, float] | None = None,
    others: tuple[int, int] = (0, 1),
) -> None:
    """Every item gets a v1 vector; `v2` items (default: those whose task is done) a v2 vector; `tasks` maps an
    item index to its task's state in the rollout under test; `deleted` item indexes are soft-deleted. The
    ended rollout gets a pending and a leased task (on the items `others`)."""
    v2 = {i for i, st in tasks.items() if st == "done"} if v2 is None else v2
    with w.maker() as s:
        for n, iid in enumerate(w.items):
            s.add(Embedding(item_id=iid, model_version="v1", vector=b"\0" * 8))
            if n in v2:
                s.add(Embedding(item_id=iid, model_version="v2", vector=b"\1" * 8))
            if n in deleted:
                s.execute(sa.update(Item).where(Item.id == iid).values(deleted_at=EARLIER))
        for n, st in tasks.items():
            s.add(
                BackfillTask(
                    rollout_id=w.rollout,
                    item_id=w.items[n],
                    state=st,
                    updated_at=EARLIER,
                    priority=(priorities or {}).get(n, float(n)),
                    attempts=MAX if st == "failed" else 1,
                    done_at=EARLIER if st == "done" else None,
                )
            )
        for n, st in zip(others, ("pending", "leased"), strict=True):
            s.add(
                BackfillTask(
                    rollout_id=w.other, item_id=w.items[n], state=st, priority=1000.0, attempts=1, updated_at=EARLIER
                )
            )
        s.commit()


def snapshot(w: World) -> dict[str, Any]:
    """The rollouts, the models, the tasks and the vectors as committed now."""
    with w.maker() as s:
        rollouts = {int(r.id): {c: getattr(r, c) for c in ROLLOUT_COLUMNS} for r in s.scalars(sa.select(Rollout))}
        models = dict(s.execute(sa.select(ModelVersion.name, ModelVersion.status)).tuples().all())
        t = BackfillTask.__table__
        tasks = {int(r["id"]): dict(r) for r in s.execute(sa.select(*(t.c[c] for c in TASK_COLUMNS))).mappings()}
        vectors = sorted((m, int(i)) for m, i in s.execute(sa.select(Embedding.model_version, Embedding.item_id)))
    return {"rollouts": rollouts, "models": models, "tasks": tasks, "vectors": vectors}


def lock_is_free(w: World) -> bool:
    """The rollout row can be locked by someone else right now (the call under test ended its transaction)."""
    with w.maker() as s:
        try:
            s.execute(sa.select(Rollout.id).where(Rollout.id == w.rollout).with_for_update(nowait=True))
            return True
        except sa.exc.OperationalError:
            return False
        finally:
            s.rollback()


class Events:
    """A subscription to the event channel on the real Redis server, filtered to one rollout id."""

    def __init__(self, url: str, rollout_id: int) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(events.CHANNEL)
        self.rollout_id = rollout_id
        self.seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # subscribed once Redis confirms it
            msg = self.pubsub.get_message(timeout=0.05)
            if msg and msg["type"] == "subscribe":
                break

    def wait_for(self, **fields: Any) -> list[dict[str, Any]]:
        """Read until an event with `fields` arrived (2 s at most); returns this rollout's events so far."""
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not any(fields.items() <= e.items() for e in self.seen):
            msg = self.pubsub.get_message(timeout=0.05)
            if msg and msg["type"] == "message":
                data = json.loads(msg["data"])
                if data.get("rollout_id") == self.rollout_id:
                    self.seen.append(data)
        return self.seen

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@pytest.fixture
def seen(world: World, redis_url: str) -> Iterator[Events]:
    ev = Events(redis_url, world.rollout)
    world.r = redis.Redis.from_url(redis_url)
    yield ev
    ev.close()
    world.r.close()


def complete(w: World) -> Rollout | None:
    with w.maker() as s:
        return domain.complete(s, w.settings, w.rollout, r=w.r)


def ended(before: dict[str, Any], w: World, status: str, error: str | None = None) -> dict[str, Any]:
    want = json.loads(json.dumps(before, default=str))  # a deep copy
    want["rollouts"][str(w.rollout)].update(status=status, active_lock=None, finished_at=str(T0), error=error)
    return want


def as_json(snap: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(snap, default=str))


def test_complete_switches_the_serving_model_when_every_task_is_done(world: World, seen: Events) -> None:
    w = world
    # Item 10 is deleted without a vector or a task: not owed one. The ended rollout's unfinished tasks
    # do not count.
    setup_rows(w, {n: "done" for n in range(10)} | {11: "done"}, deleted={10})
    before = snapshot(w)
    got = complete(w)
    assert got is not None and got.id == w.rollout and got.status == "completed"
    want = ended(before, w, "completed")
    want["models"].update(v1="retired", v2="serving")  # v0 stays retired, v3 registered
    assert as_json(snapshot(w)) == want  # the tasks and the vectors unchanged: v1's kept 7 days
    assert lock_is_free(w)
    assert seen.wait_for(status="completed") == [
        {"type": events.ROLLOUT, "rollout_id": w.rollout, "status": "completed"}
    ]
    after = snapshot(w)
    assert complete(w) is None and snapshot(w) == after and lock_is_free(w)  # once only


@pytest.mark.parametrize("world", [0.0], indirect=True)
def test_completion_sweeps_the_retired_vectors_when_retention_is_zero(world: World) -> None:
    w = world
    setup_rows(w, {n: "done" for n in range(12)})
    before = snapshot(w)
    assert complete(w) is not None
    want = ended(before, w, "completed")
    want["models"].update(v1="retired", v2="serving")
    want["vectors"] = [v for v in want["vectors"] if v[0] != "v1"]
    assert as_json(snapshot(w)) == want


@pytest.mark.parametrize("world", [0.0], indirect=True)
def test_failed_tasks_end_the_rollout_failed_and_keep_the_old_model(world: World, seen: Events) -> None:
    w = world
    setup_rows(w, {n: "done" for n in range(9)} | {9: "failed", 10: "failed", 11: "done"})
    before = snapshot(w)
    got = complete(w)
    assert got is not None and got.status == "failed"
    error = (
        f"2 item(s) failed after {MAX} attempts (see backfill_tasks.last_error); v1 stays serving. "
        "Fix or delete them and upgrade again."
    )
    assert as_json(snapshot(w)) == ended(before, w, "failed", error)  # models and vectors as they were
    assert lock_is_free(w)
    assert seen.wait_for(status="failed")[-1] == {"type": events.ROLLOUT, "rollout_id": w.rollout, "status": "failed"}


@pytest.mark.parametrize("left", ["pending", "leased"])
def test_complete_waits_while_a_task_is_pending_or_leased(world: World, left: str) -> None:
    w = world
    setup_rows(w, {n: "done" for n in range(12)} | {4: left})
    before = snapshot(w)
    assert complete(w) is None
    assert snapshot(w) == before and lock_is_free(w)


@pytest.mark.parametrize("status", ["training", "planning", "paused", "completed", "aborted", "failed"])
def test_complete_leaves_a_rollout_that_is_not_running_alone(world: World, status: str) -> None:
    w = world
    setup_rows(w, {n: "done" for n in range(12)})
    with w.maker() as s:
        s.execute(sa.update(Rollout).where(Rollout.id == w.rollout).values(status=status))
        s.commit()
    before = snapshot(w)
    assert complete(w) is None
    assert snapshot(w) == before and lock_is_free(w)


def test_items_without_a_target_vector_are_requeued_before_completion(
    world: World, seen: Events, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 3: a done task but no v2 vector (deleted and revived meanwhile); items 1 and 7: live, no task, no
    vector (written across the rollout's start; item 1 has a task in the ended rollout, which does not count);
    item 8: its task failed (left to end the rollout failed); item 9: deleted, no vector. The re-queued tasks
    go ahead of every task of this rollout (the ended rollout's priorities do not count), with their attempts
    reset; the ended rollout's tasks (items 1 and 3) stay as they are."""
    w = world
    tasks = {n: "done" for n in (0, 2, 3, 4, 5, 6)} | {8: "failed", 10: "done", 11: "done"}
    prio = {0: 0.5, 2: -1.0, 3: 0.0, 4: 1.0, 5: 2.0, 6: 0.25, 8: 1.5, 10: 0.0, 11: 0.0}
    setup_rows(w, tasks, v2=set(tasks) - {3, 8}, deleted={9}, priorities=prio, others=(1, 3))
    before = snapshot(w)
    with caplog.at_level(logging.WARNING, logger="service.rollouts"):
        assert complete(w) is None
    assert [r.getMessage() for r in caplog.records if r.name == "service.rollouts"] == [
        f"rollout {w.rollout}: 3 live item(s) without a v2 vector at completion: re-queued"
    ]

    after = snapshot(w)
    top = max(prio.values()) + 1.0
    want = as_json(before)
    t3 = next(i for i, t in before["tasks"].items() if t["item_id"] == w.items[3] and t["rollout_id"] == w.rollout)
    want["tasks"][str(t3)].update(state="pending", attempts=0, priority=top, done_at=None, updated_at=str(T0))
    new = [t for i, t in after["tasks"].items() if i not in before["tasks"]]
    assert [(t["rollout_id"], t["item_id"], t["state"], t["attempts"], t["priority"]) for t in new] == [
        (w.rollout, w.items[n], "pending", 0, top) for n in (1, 7)
    ]
    want["tasks"].update({str(t["id"]): as_json(t) for t in new})
    assert as_json(after) == want  # the rollout still running, holding its lock; nothing else moved
    assert lock_is_free(w)
    assert seen.wait_for(status="running")[-1] == {"type": events.ROLLOUT, "rollout_id": w.rollout, "status": "running"}

    # Once they are done (with their vectors) the failed task ends the rollout `failed`.
    with w.maker() as s:
        s.execute(
            sa.update(BackfillTask)
            .where(BackfillTask.state == "pending", BackfillTask.rollout_id == w.rollout)
            .values(state="done")
        )
        s.add_all(Embedding(item_id=w.items[n], model_version="v2", vector=b"\1" * 8) for n in (1, 3, 7))
        s.commit()
    got = complete(w)
    assert got is not None and got.status == "failed" and got.error and got.error.startswith("1 item(s) failed")


def test_a_done_task_without_its_vector_is_requeued_alone(world: World) -> None:
    w = world
    setup_rows(w, {n: "done" for n in range(12)}, v2=set(range(12)) - {5})
    before = snapshot(w)
    with w.maker() as s:
        assert domain.requeue_missing(s, domain.get_rollout(s, w.rollout)) == 1
        s.commit()
    want = as_json(before)
    t5 = next(i for i, t in before["tasks"].items() if t["item_id"] == w.items[5] and t["rollout_id"] == w.rollout)
    want["tasks"][str(t5)].update(state="pending", attempts=0, priority=12.0, done_at=None, updated_at=str(T0))
    assert as_json(snapshot(w)) == want


def test_requeue_counts_and_starts_above_zero_without_tasks(world: World) -> None:
    w = world
    setup_rows(w, {}, v2={0, 1})  # no task at all in the rollout: the new ones get priority 0 + 1
    with w.maker() as s:
        rollout = domain.get_rollout(s, w.rollout)
        assert domain.requeue_missing(s, rollout) == len(w.items) - 2
        s.commit()
    tasks = snapshot(w)["tasks"].values()
    mine = sorted(
        (t["item_id"], t["priority"], t["state"], t["attempts"]) for t in tasks if t["rollout_id"] == w.rollout
    )
    assert mine == [(i, 1.0, "pending", 0) for i in w.items[2:]]
    with w.maker() as s:  # every live item has a vector or a task now: nothing more
        assert domain.requeue_missing(s, domain.get_rollout(s, w.rollout)) == 0


def test_task_counts_count_one_rollout_by_state(world: World) -> None:
    w = world
    states = ["done", "done", "failed", "pending", "leased", "leased", "leased"]
    setup_rows(w, dict(enumerate(states)))
    with w.maker() as s:
        got = domain.task_counts(s, w.rollout)
        assert domain.task_counts(s, w.other) == {"pending": 1, "leased": 1, "done": 0, "failed": 0}
        assert domain.task_counts(s, w.other + 1) == {"pending": 0, "leased": 0, "done": 0, "failed": 0}
    assert got == {st: states.count(st) for st in ("pending", "leased", "done", "failed")}


# --- the operator's transitions --------------------------------------------------------------------------
ACTIVE = ["training", "planning", "running"]  # and paused
ENDED = ["completed", "aborted", "failed"]


def set_rollout(w: World, **values: Any) -> None:
    with w.maker() as s:
        s.execute(sa.update(Rollout).where(Rollout.id == w.rollout).values(**values))
        s.commit()


def ended_lock(status: str) -> dict[str, Any]:
    return {"status": status, "active_lock": None, "finished_at": T0 - dt.timedelta(minutes=5)}


def with_status(before: dict[str, Any], w: World, **values: Any) -> dict[str, Any]:
    want = as_json(before)
    want["rollouts"][str(w.rollout)].update(values)
    return want


@pytest.mark.parametrize("status", ACTIVE)
def test_pause_pauses_an_active_rollout(world: World, seen: Events, status: str) -> None:
    w = world
    setup_rows(w, {0: "done", 1: "pending"})
    set_rollout(w, status=status)
    before = snapshot(w)
    with w.maker() as s:
        assert domain.pause(s, w.rollout, r=w.r).status == "paused"
    assert as_json(snapshot(w)) == with_status(before, w, status="paused") and lock_is_free(w)
    assert seen.wait_for(status="paused") == [{"type": events.ROLLOUT, "rollout_id": w.rollout, "status": "paused"}]


def test_pause_is_idempotent_and_resume_leaves_an_active_rollout_alone(world: World) -> None:
    w = world
    setup_rows(w, {0: "done", 1: "pending"})
    for status, fn in [("paused", domain.pause), *((st, domain.resume) for st in ACTIVE)]:
        set_rollout(w, status=status)
        before = snapshot(w)
        with w.maker() as s:
            assert fn(s, w.rollout).status == status
        assert snapshot(w) == before and lock_is_free(w)


@pytest.mark.parametrize("status", ENDED)
def test_an_ended_rollout_cannot_pause_resume_or_abort(world: World, status: str) -> None:
    w = world
    setup_rows(w, {0: "done", 1: "pending"})
    set_rollout(w, **ended_lock(status))
    before = snapshot(w)
    for fn, only in (
        (domain.pause, "an active one can pause"),
        (domain.resume, "a paused one can resume"),
        (domain.abort, "an active one can abort"),
    ):
        with w.maker() as s, pytest.raises(domain.Conflict) as refused:
            fn(s, w.rollout)
        assert (refused.value.field, refused.value.problem) == (
            "status",
            f"rollout {w.rollout} is {status}; only {only}",
        )
        assert snapshot(w) == before and lock_is_free(w)
    with w.maker() as s, pytest.raises(domain.Conflict):
        domain.abort(s, w.rollout, purge=True)
    assert snapshot(w) == before


def test_an_unknown_rollout_is_not_found(world: World) -> None:
    w = world
    for fn in (domain.pause, domain.resume, domain.abort):
        with w.maker() as s:
            with pytest.raises(domain.NotFound) as missing:
                fn(s, w.rollout + 7)
            assert not s.in_transaction()  # rolled back
        assert (missing.value.field, missing.value.problem) == ("id", f"rollout {w.rollout + 7} does not exist")


@pytest.mark.parametrize(
    ("started", "training", "expected"),
    [
        (True, None, "running"),
        (False, None, "planning"),
        (True, {"sample": 5, "done": False}, "training"),
        (False, {"sample": 5}, "training"),
        (True, {"sample": 5, "done": True}, "running"),
        (False, {"sample": 5, "done": True}, "planning"),
    ],
)
def test_resume_goes_back_to_the_phase_the_rollout_was_paused_in(
    world: World, seen: Events, started: bool, training: dict[str, Any] | None, expected: str
) -> None:
    w = world
    setup_rows(w, {0: "done", 1: "pending"})
    set_rollout(w, status="paused", started_at=EARLIER if started else None, training=training)
    before = snapshot(w)
    with w.maker() as s:
        assert domain.resume(s, w.rollout, r=w.r).status == expected
    assert as_json(snapshot(w)) == with_status(before, w, status=expected) and lock_is_free(w)
    assert seen.wait_for(status=expected) == [{"type": events.ROLLOUT, "rollout_id": w.rollout, "status": expected}]


def add_v3_vectors(w: World) -> None:
    with w.maker() as s:
        s.add_all(Embedding(item_id=i, model_version="v3", vector=b"\3" * 8) for i in w.items[:3])
        s.commit()


@pytest.mark.parametrize("status", [*ACTIVE, "paused"])
def test_abort_ends_an_active_rollout_and_the_old_model_keeps_serving(world: World, seen: Events, status: str) -> None:
    w = world
    setup_rows(w, {0: "done", 1: "done", 2: "pending", 3: "leased"})
    add_v3_vectors(w)
    set_rollout(w, status=status)
    before = snapshot(w)
    with w.maker() as s:
        got = domain.abort(s, w.rollout, r=w.r)  # purge_on_abort is False: the v2 vectors stay
    assert got.status == "aborted"
    assert as_json(snapshot(w)) == ended(before, w, "aborted") and lock_is_free(w)
    seen.wait_for(type=events.EMBEDDINGS)
    assert seen.seen == [
        {"type": events.ROLLOUT, "rollout_id": w.rollout, "status": "aborted"},
        {"type": events.EMBEDDINGS, "rollout_id": w.rollout},
    ]


@pytest.mark.parametrize(
    ("purge_on_abort", "purge", "purged"),
    [(False, True, True), (True, None, True), (True, False, False), (False, None, False)],
)
def test_abort_purges_the_target_vectors_only_when_asked(
    world: World, purge_on_abort: bool, purge: bool | None, purged: bool
) -> None:
    w = world
    setup_rows(w, {0: "done", 1: "done", 2: "pending"})
    add_v3_vectors(w)
    set_rollout(w, purge_on_abort=purge_on_abort)
    before = snapshot(w)
    with w.maker() as s:
        domain.abort(s, w.rollout, purge=purge)
    want = ended(before, w, "aborted")
    if purged:
        want["vectors"] = [v for v in want["vectors"] if v[0] != "v2"]
    assert as_json(snapshot(w)) == want


@pytest.mark.parametrize(
    ("old", "new", "old_after", "new_after"),
    [
        ("retired", "serving", "serving", "registered"),  # switched by hand (or a crash) mid-rollout
        ("registered", "retired", "serving", "retired"),
        ("serving", "registered", "serving", "registered"),
    ],
)
def test_abort_puts_the_old_model_back_to_serving(
    world: World, old: str, new: str, old_after: str, new_after: str
) -> None:
    w = world
    with w.maker() as s:
        s.execute(sa.update(ModelVersion).where(ModelVersion.name == "v1").values(status=old))
        s.execute(sa.update(ModelVersion).where(ModelVersion.name == "v2").values(status=new))
        s.commit()
    before = snapshot(w)
    with w.maker() as s:
        domain.abort(s, w.rollout)
    want = ended(before, w, "aborted")
    want["models"].update(v1=old_after, v2=new_after)
    assert as_json(snapshot(w)) == want
