"""Backfill jobs against real Postgres + Redis: plan, claim order, parallel drivers, pause/resume, throttle,
abort, failures, deleted items. Tiny random models and digits-sized images keep it fast."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from devtools.fakes import embedding_counts, gallery_images, make_tiny_artifacts, seed_gallery
from models.artifacts import Encoder, load_compat, load_encoder
from models.preprocess import encode_png
from service import rollouts as domain
from service.config import Settings
from service.db import BackfillTask, Embedding, Item, ModelVersion, make_engine, make_sessionmaker
from service.db.models import Rollout, utcnow
from service.gallery import NewItem, add_items
from service.redis_conn import make_redis
from tests.helpers import stays_true, wait_until
from worker import backfill, context, driver, plan
from worker.main import build_worker

pytestmark = pytest.mark.integration


@dataclass
class Env:
    settings: Settings
    ctx: context.WorkerContext
    session: Session
    items: list[int]
    artifacts: dict[str, Path]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_artifacts(tmp_path_factory.mktemp("artifacts"), slow_reps=2)


def make_env(settings: Settings, artifacts: dict[str, Path], n_items: int, **overrides: object) -> Env:
    s = settings.model_copy(update={"artifacts_dir": artifacts["v1"].parent, "metrics_port": 0, **overrides})
    ctx = context.configure(s)
    session = ctx.sessionmaker()
    items = seed_gallery(session, artifacts, n_items)
    return Env(s, ctx, session, items, artifacts)


@pytest.fixture
def env(settings: Settings, artifacts: dict[str, Path]) -> Iterator[Env]:
    e = make_env(settings, artifacts, 120)
    yield e
    e.session.close()


def start(env: Env, **kw: object) -> int:
    rollout = domain.create_rollout(env.session, env.settings, to="v2", **kw)  # type: ignore[arg-type]
    plan.plan_rollout(rollout.id)
    return rollout.id


def status(env: Env, rid: int) -> str:
    return domain.get_rollout(env.session, rid).status


def model_status(env: Env) -> dict[str, str]:
    env.session.expire_all()
    return {m.name: m.status for m in env.session.scalars(sa.select(ModelVersion))}


def test_whole_rollout_through_rq_completes(env: Env) -> None:
    rollout = domain.create_rollout(env.session, env.settings, to="v2", batch_size=32)
    assert domain.enqueue_plan(env.ctx.redis, env.settings, rollout.id)
    assert not domain.enqueue_plan(env.ctx.redis, env.settings, rollout.id)  # unique job id: no double plan
    build_worker(env.ctx).work(burst=True)

    r = domain.get_rollout(env.session, rollout.id)
    assert r.status == "completed" and r.active_lock is None and r.finished_at is not None
    assert model_status(env) == {"v1": "retired", "v2": "serving"}
    assert embedding_counts(env.session, "v2") == (len(env.items), len(env.items))
    assert embedding_counts(env.session, "v1")[0] == len(env.items)  # old vectors kept (retention 7 days)
    p = domain.progress(env.session, r)
    assert (p.total, p.done, p.failed, p.fraction, p.eta_seconds) == (
        len(env.items),
        len(env.items),
        0,
        1.0,
        0.0,
    )
    assert p.items_per_second > 0
    # The new vectors are the v2 encoder's output for the stored payloads.
    enc = env.ctx.encoder(env.session.get(ModelVersion, "v2"))  # type: ignore[arg-type]
    from models.preprocess import preprocess

    item = env.session.get(Item, env.items[7])
    assert item is not None
    row = env.session.scalars(
        sa.select(Embedding).where(Embedding.item_id == item.id, Embedding.model_version == "v2")
    ).one()
    np.testing.assert_allclose(
        np.frombuffer(row.vector, dtype="<f4"), enc.embed(preprocess(item.payload)[None])[0], atol=1e-5
    )


def test_claims_follow_sigma_order_exactly(settings: Settings, artifacts: dict[str, Path]) -> None:
    # Big enough that a careless UPDATE ... IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED) plan would claim
    # more than n rows.
    env = make_env(settings, artifacts, 1500)
    rid = start(env, policy="uncertainty", batch_size=128)
    with env.ctx.sessionmaker() as s:
        first = backfill.claim(s, env.ctx, rid, 128)
        second = backfill.claim(s, env.ctx, rid, 128)
    rows = env.session.execute(
        sa.select(Embedding.item_id, Embedding.vector)
        .where(Embedding.model_version == "v1")
        .order_by(Embedding.item_id)
    ).all()
    vecs = np.stack([np.frombuffer(v, "<f4") for _, v in rows])
    order = np.array([i for i, _ in rows])[np.argsort(-load_compat(env.artifacts["compat"]).uncertainty(vecs))]
    assert len(first.tasks) == 128 and len(second.tasks) == 128
    assert set(first.tasks.values()) == set(order[:128].tolist())  # the first batch: the highest sigma
    assert set(second.tasks.values()) == set(order[128:256].tolist())
    env.session.close()


def test_fifo_claims_in_item_order(env: Env) -> None:
    rid = start(env, policy="fifo")
    with env.ctx.sessionmaker() as s:
        claimed = backfill.claim(s, env.ctx, rid, 10)
    assert sorted(claimed.tasks.values()) == env.items[:10]


def test_two_workers_share_without_overlap(env: Env, artifacts: dict[str, Path]) -> None:
    rid = start(env, policy="random", batch_size=8)
    # Two independent worker contexts (own engine, Redis client and model copies), run side by side.
    contexts = [
        context.WorkerContext(
            env.settings,
            make_sessionmaker(make_engine(env.settings)),
            make_redis(env.settings),
            worker_id=f"w{i}",
        )
        for i in range(2)
    ]
    barrier = threading.Barrier(2)
    summaries: list[driver.DriveSummary] = [driver.DriveSummary(rid), driver.DriveSummary(rid)]

    def run(i: int) -> None:
        barrier.wait()
        summaries[i] = driver.drive(contexts[i], rid)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    a, b = (set(s.embedded) for s in summaries)
    assert len(summaries[0].embedded) == len(a) and len(summaries[1].embedded) == len(b)
    assert a.isdisjoint(b), "an item was embedded by both workers"
    assert a | b == set(env.items)
    assert a and b, "both workers should have taken part"
    assert {s.outcome for s in summaries} <= {"completed", "finished-elsewhere"}
    assert status(env, rid) == "completed"
    # Nobody claimed a task twice (leases never expired here) and every item has exactly one v2 vector.
    assert env.session.scalar(sa.select(sa.func.max(BackfillTask.attempts))) == 1
    assert embedding_counts(env.session, "v2") == (len(env.items), len(env.items))


def _run_in_thread(env: Env, rid: int) -> tuple[threading.Thread, list[driver.DriveSummary]]:
    out: list[driver.DriveSummary] = []
    t = threading.Thread(target=lambda: out.append(driver.drive(env.ctx, rid)))
    t.start()
    return t, out


def _done(env: Env, rid: int) -> int:
    with env.ctx.sessionmaker() as s:
        return domain.task_counts(s, rid)["done"]


def _healthy_worker(env: Env) -> context.WorkerContext:
    """`env`'s context with a lease no batch outlives, however loaded the machine: the short lease of the
    tests below is for the claims that play a dead worker, not for the driver that must finish the work."""
    return dataclasses.replace(env.ctx, settings=env.settings.model_copy(update={"lease_seconds": 60.0}))


def _leases_expired(env: Env, task_ids: Iterable[int]) -> bool:
    """Every lease of `task_ids` has run out by the clock that `backfill.claim` reads (utcnow)."""
    with env.ctx.sessionmaker() as s:
        ends = s.scalars(sa.select(BackfillTask.lease_expires_at).where(BackfillTask.id.in_(list(task_ids)))).all()
    now = utcnow()
    return bool(ends) and all(e is not None and e < now for e in ends)


def test_pause_stops_progress_and_resume_continues(env: Env) -> None:
    rid = start(env, batch_size=5, max_items_per_second=60)
    t, out = _run_in_thread(env, rid)
    wait_until(lambda: _done(env, rid) >= 10)
    domain.pause(env.session, rid)
    t.join(timeout=10)
    assert not t.is_alive() and out[0].outcome == "paused"
    frozen = _done(env, rid)
    assert frozen < len(env.items)
    stays_true(lambda: _done(env, rid) == frozen, 0.5)  # nothing moves while paused
    assert driver.drive(env.ctx, rid).outcome == "paused"  # a driver started while paused does nothing
    assert _done(env, rid) == frozen

    domain.resume(env.session, rid)
    domain.set_throttle(env.session, rid, None)
    assert driver.drive(env.ctx, rid).outcome == "completed"
    assert embedding_counts(env.session, "v2") == (len(env.items), len(env.items))


def test_throttle_bounds_the_rate(env: Env) -> None:
    rate, n = 40.0, 100
    rid = start(env, batch_size=64, max_items_per_second=rate)
    env.ctx.redis.delete(f"backfill:throttle:{rid}")
    t0 = time.monotonic()
    summary = driver.drive(env.ctx, rid)
    elapsed = time.monotonic() - t0
    assert summary.outcome == "completed"
    total = len(env.items)
    # Batches of `rate` items are spaced 1 s apart: the first is free, the rest wait their turn.
    assert elapsed >= (total - rate) / rate * 0.95, elapsed
    done_at = sorted(
        t for t in env.session.scalars(sa.select(BackfillTask.done_at).where(BackfillTask.rollout_id == rid))
    )
    span = (done_at[-1] - done_at[0]).total_seconds()
    assert (total - rate) / span <= rate * 1.15
    del n


def test_abort_returns_to_old_model_and_purges(env: Env) -> None:
    rid = start(env, batch_size=20)
    rollout = domain.get_rollout(env.session, rid)
    assert backfill.run_batch(env.ctx, rollout, 20).embedded
    assert embedding_counts(env.session, "v2")[0] == 20
    aborted = domain.abort(env.session, rid, purge=True)
    assert aborted.status == "aborted" and aborted.active_lock is None and aborted.finished_at is not None
    assert model_status(env) == {"v1": "serving", "v2": "registered"}
    assert embedding_counts(env.session, "v2")[0] == 0
    assert embedding_counts(env.session, "v1")[0] == len(env.items)
    assert driver.drive(env.ctx, rid).outcome == "aborted"
    assert embedding_counts(env.session, "v2")[0] == 0
    with pytest.raises(domain.Conflict):
        domain.resume(env.session, rid)
    # The lock is released: a new rollout may start, and it reuses nothing.
    again = domain.create_rollout(env.session, env.settings, to="v2")
    assert again.status == "planning"


def test_abort_without_purge_keeps_new_vectors(env: Env) -> None:
    rid = start(env, batch_size=20)
    backfill.run_batch(env.ctx, domain.get_rollout(env.session, rid), 20)
    domain.abort(env.session, rid)  # settings.purge_on_abort is False
    assert embedding_counts(env.session, "v2")[0] == 20
    assert model_status(env)["v1"] == "serving"


def test_in_flight_batch_after_abort_writes_nothing(env: Env) -> None:
    rid = start(env, batch_size=10)
    rollout = domain.get_rollout(env.session, rid)
    with env.ctx.sessionmaker() as s:
        claimed = backfill.claim(s, env.ctx, rid, 10)
    domain.abort(env.session, rid, purge=True)
    vectors = {iid: np.ones(24, np.float32) for iid in claimed.tasks.values()}
    with env.ctx.sessionmaker() as s:
        res = backfill.commit_batch(s, env.ctx, rollout, claimed, vectors, {})
    assert res.embedded == [] and embedding_counts(env.session, "v2")[0] == 0


def test_bad_payloads_fail_after_max_attempts_and_deleted_items_are_skipped(env: Env) -> None:
    bad, gone = env.items[3], env.items[5]
    env.session.execute(sa.update(Item).where(Item.id == bad).values(payload=b"not an image"))
    env.session.execute(sa.update(Item).where(Item.id == gone).values(deleted_at=utcnow()))
    env.session.commit()
    rid = start(env, batch_size=16)
    env.session.execute(sa.update(Item).where(Item.id == env.items[6]).values(deleted_at=utcnow()))
    env.session.commit()  # deleted after planning: its task ends done, without an embedding
    summary = driver.drive(env.ctx, rid)
    r = domain.get_rollout(env.session, rid)
    assert summary.outcome == "failed" and r.status == "failed" and r.active_lock is None
    assert r.error and "1 item(s) failed" in r.error
    task = env.session.scalars(
        sa.select(BackfillTask).where(BackfillTask.rollout_id == rid, BackfillTask.item_id == bad)
    ).one()
    assert task.state == "failed" and task.attempts == env.settings.max_attempts
    assert task.last_error and "invalid payload" in task.last_error
    embedded = set(env.session.scalars(sa.select(Embedding.item_id).where(Embedding.model_version == "v2")))
    assert embedded == set(env.items) - {bad, gone, env.items[6]}
    assert model_status(env)["v1"] == "serving"  # never serve a model that leaves items unsearchable
    counts = domain.task_counts(env.session, rid)
    assert counts == {"pending": 0, "leased": 0, "done": len(env.items) - 2, "failed": 1}


def test_expired_lease_is_reclaimed_and_late_commit_is_dropped(settings: Settings, artifacts: dict[str, Path]) -> None:
    env = make_env(settings, artifacts, 30, lease_seconds=0.3)
    rid = start(env, batch_size=10)
    rollout = domain.get_rollout(env.session, rid)
    with env.ctx.sessionmaker() as s:
        stale = backfill.claim(s, env.ctx, rid, 10)  # a worker that then stalls
    assert len(stale.tasks) == 10
    wait_until(lambda: _leases_expired(env, stale.tasks), timeout=10)  # the stalled worker's lease runs out
    summary = driver.drive(_healthy_worker(env), rid)  # reclaims the expired lease and finishes everything
    assert summary.outcome == "completed" and set(summary.embedded) == set(env.items)
    vectors = {iid: np.ones(24, np.float32) for iid in stale.tasks.values()}
    with env.ctx.sessionmaker() as s:
        late = backfill.commit_batch(s, env.ctx, rollout, stale, vectors, {})
    assert late.embedded == [] and late.lost_lease == 10
    assert embedding_counts(env.session, "v2") == (30, 30)
    env.session.close()


def test_a_task_that_kills_its_worker_every_time_ends_failed(settings: Settings, artifacts: dict[str, Path]) -> None:
    """A payload that crashes the worker (OOM, segfault) never reaches the failure path: only the lease
    expires. After `max_attempts` such claims the task ends `failed` and the rollout finishes."""
    env = make_env(settings, artifacts, 12, lease_seconds=0.2, max_attempts=2)
    rid = start(env, batch_size=4, policy="fifo")
    killed: set[int] = set()
    for _ in range(env.settings.max_attempts):
        with env.ctx.sessionmaker() as s:
            claimed = backfill.claim(s, env.ctx, rid, 1)  # the worker takes the poison task, then dies
        killed |= set(claimed.tasks)
        wait_until(partial(_leases_expired, env, claimed.tasks), timeout=10)  # and its lease runs out
    assert len(killed) == 1
    with env.ctx.sessionmaker() as s:
        other = backfill.claim(s, env.ctx, rid, 1).tasks
    assert len(other) == 1 and not set(other) & killed  # not handed to another victim
    wait_until(lambda: _leases_expired(env, other), timeout=10)  # that claimer dies too: drive reclaims it
    summary = driver.drive(_healthy_worker(env), rid)
    assert summary.outcome == "failed" and status(env, rid) == "failed"
    env.session.expire_all()
    task = env.session.get(BackfillTask, killed.pop())
    assert task is not None and task.state == "failed" and task.attempts == env.settings.max_attempts
    assert task.last_error and "lease expired" in task.last_error
    assert domain.task_counts(env.session, rid) == {"pending": 0, "leased": 0, "done": 11, "failed": 1}
    env.session.close()


def test_retention_sweep_deletes_old_vectors_after_the_window(settings: Settings, artifacts: dict[str, Path]) -> None:
    env = make_env(settings, artifacts, 20, old_embedding_retention_days=0)
    rid = start(env)
    assert driver.drive(env.ctx, rid).outcome == "completed"
    assert embedding_counts(env.session, "v1")[0] == 0 and embedding_counts(env.session, "v2")[0] == 20
    env.session.close()


def test_the_sweep_spares_a_retired_model_that_a_running_rollout_goes_back_to(
    settings: Settings, artifacts: dict[str, Path]
) -> None:
    env = make_env(settings, artifacts, 10, old_embedding_retention_days=1)
    assert driver.drive(env.ctx, start(env)).outcome == "completed"
    assert model_status(env) == {"v1": "retired", "v2": "serving"}
    back = Rollout(
        from_version="v2", to_version="v1", mode="reverse", policy="fifo", status="running", batch_size=4, active_lock=1
    )
    env.session.add(back)
    env.session.commit()
    later = utcnow() + dt.timedelta(days=2)  # past the retention window
    assert domain.sweep_retired_embeddings(env.session, env.settings, now=later) == 0
    assert embedding_counts(env.session, "v1")[0] == 10  # the rollout back to v1 keeps its vectors
    back.status, back.active_lock = "aborted", None
    env.session.commit()
    assert domain.sweep_retired_embeddings(env.session, env.settings, now=later) == 10
    env.session.close()


def test_an_item_written_across_the_rollout_start_still_gets_its_vector(env: Env) -> None:
    """The race of POST /items against the plan: a writer that read the layout before the rollout existed
    stores only the old vector, and the plan scanned before it committed, so it has no task. Completion
    re-checks every live item for a target vector and backfills the stragglers before switching models."""
    rid = start(env, batch_size=32)
    late = Item(external_id="late-writer", payload=env.session.get(Item, env.items[0]).payload)  # type: ignore[union-attr]
    env.session.add(late)
    env.session.flush()
    v1 = env.session.scalars(sa.select(Embedding).where(Embedding.item_id == env.items[0])).one()
    env.session.add(Embedding(item_id=late.id, model_version="v1", vector=v1.vector))
    env.session.commit()
    assert driver.drive(env.ctx, rid).outcome == "completed"
    embedded = set(env.session.scalars(sa.select(Embedding.item_id).where(Embedding.model_version == "v2")))
    assert embedded == {*env.items, late.id}
    task = env.session.scalars(sa.select(BackfillTask).where(BackfillTask.item_id == late.id)).one()
    assert task.state == "done"


class Encoders:
    """The EncoderSource that POST /items uses, over the test artifacts."""

    def __init__(self, artifacts: dict[str, Path]) -> None:
        self.cache = {name: load_encoder(artifacts[name]) for name in ("v1", "v2")}

    def encoder(self, name: str) -> Encoder:
        return self.cache[name]


@pytest.mark.parametrize("run", range(3))
def test_items_written_concurrently_across_a_whole_rollout_all_get_their_vector(
    settings: Settings, artifacts: dict[str, Path], run: int
) -> None:
    """Writers add items through the gallery (as POST /items does) from several threads before, during and
    after the rollout's start, its backfill and its completion, on real Postgres. Afterwards every live item
    has a v2 vector, whatever the interleaving."""
    env = make_env(settings, artifacts, 40, lease_seconds=5.0)
    encoders, images = Encoders(artifacts), gallery_images(16, seed=run)
    payloads = [encode_png(img) for img in images]
    stop, errors, written = threading.Event(), [], []

    def writer(w: int) -> None:
        k = 0
        with env.ctx.sessionmaker() as s:
            while not stop.is_set() and k < 200:
                batch = [NewItem(f"w{w}-{k + j}", payloads[(k + j) % 16], images[(k + j) % 16]) for j in range(3)]
                try:
                    add_items(s, encoders, batch)
                    written.extend(it.external_id for it in batch)
                except Exception as e:  # a real failure, reported below
                    errors.append(repr(e))
                k += 3
                time.sleep(0.002)  # pacing (lets the driver in between batches), not a wait for anything

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: len(written) >= 3, timeout=10)  # items written before the rollout exists
    rid = start(env, batch_size=16)
    outcome = driver.drive(env.ctx, rid).outcome
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert outcome == "completed" and model_status(env)["v2"] == "serving"
    env.session.expire_all()
    live = set(env.session.scalars(sa.select(Item.id).where(Item.deleted_at.is_(None))))
    with_v2 = set(env.session.scalars(sa.select(Embedding.item_id).where(Embedding.model_version == "v2")))
    assert len(live) == 40 + len(written) and live <= with_v2, sorted(live - with_v2)[:5]
    env.session.close()
