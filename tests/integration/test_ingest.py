"""The ingestion follower on real Postgres + Redis (and SQLite where the database matters): out-of-order
commits, holes of any size, long transactions, deletes, and invariant 1 while items move from OLD to NEW
under concurrent searches.

With BACKFILL_INDEX_BACKEND=milvus in the environment every follower of these tests runs on the shared
Milvus index instead (a milvus-lite file and collections of its own, the follower their writer), and
`indexed` also checks that the collection itself holds what the follower says."""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from service import events
from service.config import Settings
from service.cursor import PostgresHorizon
from service.db import make_engine, make_sessionmaker
from service.db.migrate import upgrade_head
from service.db.models import Embedding, Item, ModelVersion, Rollout
from service.index import IndexManager, IndexSet
from service.ingest import Follower
from service.redis_conn import make_redis
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

D1, D2 = 8, 12


def with_models(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    with factory() as s:
        s.add_all(
            [
                ModelVersion(name="v1", dim=D1, artifact_path="-", checksum="a", status="serving"),
                ModelVersion(name="v2", dim=D2, artifact_path="-", checksum="b", status="registered"),
            ]
        )
        s.commit()
    yield factory
    engine.dispose()


@pytest.fixture
def sm(settings: Settings) -> Iterator[sessionmaker[Session]]:
    yield from with_models(settings)


@pytest.fixture(params=["postgres", "sqlite"])
def any_sm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "postgres":
        settings: Settings = request.getfixturevalue("settings")
    else:
        settings = Settings(data_dir=tmp_path / "data")
        upgrade_head(settings)
    yield from with_models(settings)


@pytest.fixture
def no_settle_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Postgres gaps take their horizon token at once (the 1 s delay only guards a microsecond race)."""
    monkeypatch.setattr(PostgresHorizon, "settle_seconds", 0.0)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def add_items(s: Session, n: int, vecs: np.ndarray, prefix: str = "i") -> list[int]:
    items = [Item(external_id=f"{prefix}{j}", payload=b"x") for j in range(n)]
    s.add_all(items)
    s.flush()
    s.execute(
        sa.insert(Embedding),
        [{"item_id": it.id, "model_version": "v1", "vector": vecs[j].tobytes()} for j, it in enumerate(items)],
    )
    return [it.id for it in items]


def reverse_rollout() -> Rollout:
    """A running v1 -> v2 rollout on the reverse path (batches of 20), to add beside the items."""
    return Rollout(
        from_version="v1",
        to_version="v2",
        mode="reverse",
        policy="fifo",
        status="running",
        batch_size=20,
        active_lock=1,
    )


def to_new_space(src: str, dst: str, v: np.ndarray) -> np.ndarray:
    """A stand-in transformation v1 -> v2 (zero-padding: D1 -> D2, distances kept)."""
    return np.pad(v, ((0, 0), (0, D2 - D1)))


BACKEND = os.environ.get("BACKFILL_INDEX_BACKEND", "faiss")


def shared_spaces() -> object:
    """The milvus backend's maker on a milvus-lite file and collection prefix of its own."""
    from service.milvus_index import SharedSpaces

    folder = Path(tempfile.mkdtemp(prefix="backfill-milvus-"))
    return SharedSpaces(str(folder / "milvus.db"), prefix=f"t{uuid.uuid4().hex[:10]}")


def follower(sm: sessionmaker[Session], backend: str = BACKEND, **kw: object) -> tuple[Follower, IndexManager]:
    """A follower on `backend` (the environment's BACKFILL_INDEX_BACKEND by default; `make_space` wins)."""
    if backend == "milvus" and "make_space" not in kw:
        kw["make_space"] = shared_spaces()
    manager = IndexManager()
    f = Follower(
        sm,
        manager,
        factory="Flat",
        use_gpu=False,
        batch_size=int(kw.pop("batch_size", 100)),  # type: ignore[call-overload]
        poll_seconds=float(kw.pop("poll_seconds", 0.05)),
        forward=to_new_space,
        **kw,
    )  # type: ignore[arg-type]
    return f, manager


def test_out_of_order_commit_is_not_skipped(sm: sessionmaker[Session]) -> None:
    rng = np.random.default_rng(0)
    f, manager = follower(sm)
    vecs = unit(rng, 3, D1)
    with sm() as s:
        add_items(s, 1, vecs[:1], "a")
        s.commit()
    f.sync_once()
    slow, fast = sm(), sm()
    slow_ids = add_items(slow, 1, vecs[1:2], "slow")  # seq allocated first, committed last
    fast_ids = add_items(fast, 1, vecs[2:3], "fast")
    fast.commit()
    f.sync_once()
    ix = manager.current
    assert ix is not None and ix.side_of(fast_ids[0]) == "new" and ix.side_of(slow_ids[0]) is None
    assert f.cursor.gaps  # the slow seq is remembered
    slow.commit()
    f.sync_once()
    assert ix.side_of(slow_ids[0]) == "new" and not f.cursor.gaps
    slow.close()
    fast.close()


def test_deletes_and_rolled_back_gaps(sm: sessionmaker[Session], no_settle_delay: None) -> None:
    rng = np.random.default_rng(1)
    f, manager = follower(sm)
    with sm() as s:
        ids = add_items(s, 5, unit(rng, 5, D1))
        s.commit()
    with sm() as s:  # a rolled-back insert leaves a permanent hole in the sequence
        add_items(s, 1, unit(rng, 1, D1), "rb")
        s.rollback()
    with sm() as s:
        more = add_items(s, 1, unit(rng, 1, D1), "late")
        s.commit()
    f.sync_once()
    f.sync_once()
    assert not f.cursor.gaps  # settled: the rolled-back transaction has ended
    ix = manager.current
    assert ix is not None and ix.sides()["new"] == 6 and ix.side_of(more[0]) == "new"
    from service.gallery import delete_item

    with sm() as s:
        delete_item(s, "i2")
    f.sync_once()
    assert ix.side_of(ids[2]) is None and ix.sides()["new"] == 5


def live_embeddings(sm: sessionmaker[Session]) -> set[int]:
    """The independent answer: items that are live and hold a v1 row."""
    with sm() as s:
        q = sa.select(Embedding.item_id).join(Item).where(Embedding.model_version == "v1", Item.deleted_at.is_(None))
        return {int(i) for i in s.scalars(q)}


def _holds_in_new(ix: IndexSet, n: int) -> bool:
    return ix.sides()["new"] >= n


def indexed(manager: IndexManager) -> set[int]:
    ix = manager.current
    assert ix is not None and ix.new is not None
    held = ix.new.ids()
    if getattr(ix.new, "shared", False):  # the engine itself holds exactly what the follower says
        assert set(ix.new.engine_ids().tolist()) == held  # type: ignore[attr-defined]
    return held


def test_a_fresh_follower_reads_past_any_number_of_holes(any_sm: sessionmaker[Session]) -> None:
    """A restart after a retention sweep: 2,500 rows of which 2,200 were deleted (holes far more numerous
    than one batch); the first complete pass, the one that makes /readyz 200, must hold all 300."""
    rng = np.random.default_rng(3)
    with any_sm() as s:
        ids = add_items(s, 2500, unit(rng, 2500, D1))
        s.commit()
        gone = [i for j, i in enumerate(ids) if j % 25 >= 3]  # keeps 3 of every 25: short runs between holes
        s.execute(sa.delete(Embedding).where(Embedding.item_id.in_(gone)))
        s.commit()
    f, manager = follower(any_sm, batch_size=100)
    f.sync_once()
    assert indexed(manager) == live_embeddings(any_sm) and len(indexed(manager)) == 300
    with any_sm() as s:  # and it keeps following past them
        late = add_items(s, 5, unit(rng, 5, D1), "after")
        s.commit()
    f.sync_once()
    assert indexed(manager) == live_embeddings(any_sm) and set(late) <= indexed(manager)


def test_a_long_transaction_is_waited_for_without_a_time_limit(
    sm: sessionmaker[Session], no_settle_delay: None
) -> None:
    """A seq allocated by a transaction that stays open for many cycles (and far below the newest seq)
    is still applied when it commits: its gap cannot settle while the transaction runs."""
    rng = np.random.default_rng(4)
    f, manager = follower(sm, batch_size=50)
    slow = sm()
    slow_ids = add_items(slow, 1, unit(rng, 1, D1), "slow")
    for round_ in range(5):
        with sm() as s:
            add_items(s, 120, unit(rng, 120, D1), f"r{round_}-")
            s.commit()
        f.sync_once()
        assert slow_ids[0] not in indexed(manager) and len(f.cursor) >= 1
    slow.commit()
    slow.close()
    f.sync_once()
    assert indexed(manager) == live_embeddings(sm) and slow_ids[0] in indexed(manager)
    f.sync_once()
    assert not f.cursor.gaps


def test_every_live_item_found_exactly_once_during_ingestion(sm: sessionmaker[Session], settings: Settings) -> None:
    """Invariant 1: the follower (woken by Redis events) moves items OLD -> NEW as a writer commits v2
    embeddings in batches, while reader threads search with each item's own vectors."""
    rng = np.random.default_rng(2)
    n = 600
    v1 = unit(rng, n, D1)
    v2 = to_new_space("v1", "v2", v1)  # the OLD side re-scores by h(v1): a query finds its item on either side
    with sm() as s:
        ids = add_items(s, n, v1)
        s.add(reverse_rollout())
        s.commit()
    r = make_redis(settings)
    f, manager = follower(sm, r=r, poll_seconds=0.5)
    f.start()
    try:
        assert f.ready.wait(10)
        ix = manager.current
        assert ix is not None and ix.sides() == {"new": 0, "old": n}
        id_arr = np.asarray(ids)
        stop = threading.Event()
        failures: list[str] = []
        count = [0]

        def reader(seed: int) -> None:
            g = np.random.default_rng(seed)
            while not stop.is_set():
                j = g.integers(0, n, size=16)
                cur = manager.current
                assert cur is not None
                (_nd, ni), old = cur.search(v2[j], v1[j], 3)
                assert old is not None
                for row, item in enumerate(id_arr[j]):
                    c = ni[row].tolist().count(item) + old[1][row].tolist().count(item)
                    if c != 1:
                        failures.append(f"item {item}: {c}")
                count[0] += 1

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        order = rng.permutation(n)
        for b in range(0, n, 40):
            with sm() as s:
                s.execute(
                    sa.insert(Embedding),
                    [{"item_id": ids[j], "model_version": "v2", "vector": v2[j].tobytes()} for j in order[b : b + 40]],
                )
                s.commit()
            events.publish(r, events.EMBEDDINGS)
            # Each batch is moved while the readers search (the follower, woken by the event, catches up
            # before the next batch is written), instead of a fixed pause that may or may not be enough.
            moved = min(b + 40, n)
            wait_until(partial(_holds_in_new, ix, moved), timeout=10, message=lambda: str(ix.sides()))
        stop.set()
        for t in threads:
            t.join()
        assert not failures, failures[:5]
        assert count[0] > 3
        assert ix.sides() == {"new": n, "old": 0} and ix.backfilled_fraction() == 1.0
    finally:
        f.stop()
        r.close()


def test_a_deleted_newest_row_does_not_lend_its_seq(any_sm: sessionmaker[Session]) -> None:
    """A sweep that deletes the newest embedding: the next insert must still be seen by a follower that
    already passed the deleted row's seq (SQLite reused it before migration 0002)."""
    rng = np.random.default_rng(5)
    f, manager = follower(any_sm)
    with any_sm() as s:
        ids = add_items(s, 4, unit(rng, 4, D1))
        s.commit()
    f.sync_once()
    with any_sm() as s:
        s.execute(sa.delete(Embedding).where(Embedding.item_id == ids[-1]))
        s.commit()
        new = add_items(s, 1, unit(rng, 1, D1), "next")
        s.commit()
    f.sync_once()
    assert new[0] in indexed(manager) and indexed(manager) >= live_embeddings(any_sm)
