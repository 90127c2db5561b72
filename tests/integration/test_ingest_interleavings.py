"""Property: whatever interleaving of inserts, rollbacks, late commits, sweeps and deletes happens, after
every follower cycle its index holds exactly the live items that have a committed serving-model row.

Hypothesis generates the interleavings; the expected set is read back from the table (an independent
computation), never predicted. Postgres runs concurrent open transactions (late commits); SQLite, whose
writers are serialised, runs everything but those.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.cursor import PostgresHorizon
from service.db import make_engine, make_sessionmaker
from service.db.migrate import upgrade_head
from service.db.models import Embedding, Item, ModelVersion
from service.gallery import delete_item
from service.index import IndexManager
from service.ingest import Follower

pytestmark = pytest.mark.integration

D = 4
OPS = st.one_of(
    st.tuples(st.just("insert"), st.integers(1, 30)),
    st.tuples(st.just("rollback"), st.integers(1, 10)),
    st.tuples(st.just("open"), st.integers(1, 10)),
    st.tuples(st.just("commit_open"), st.integers(0, 2)),
    st.tuples(st.just("sweep"), st.integers(0, 2**16)),
    st.tuples(st.just("delete"), st.integers(0, 2**16)),
    st.tuples(st.just("sync"), st.integers(1, 40)),
)


@pytest.fixture(params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(PostgresHorizon, "settle_seconds", 0.0)  # settle as soon as it is safe
    if request.param == "postgres":
        yield request.getfixturevalue("pg")
    else:
        s = Settings(data_dir=tmp_path / "data")
        upgrade_head(s)
        yield s.sqlalchemy_url


class World:
    """The database, the writers' open transactions and one follower."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(Settings(database_url=url))
        self.sm: sessionmaker[Session] = make_sessionmaker(self.engine)
        self.concurrent = self.engine.dialect.name == "postgresql"
        with self.sm() as s:
            s.execute(sa.delete(Embedding))
            s.execute(sa.delete(Item))
            s.execute(sa.delete(ModelVersion))
            s.add_all(
                [
                    ModelVersion(name="v1", dim=D, artifact_path="-", checksum="a", status="serving"),
                    ModelVersion(name="v2", dim=D, artifact_path="-", checksum="b", status="retired"),
                ]
            )
            s.commit()
        self.open: list[Session] = []
        self.n = 0
        self.rng = np.random.default_rng(0)
        self.manager = IndexManager()
        self.follower: Follower | None = None

    def write(self, s: Session, n: int) -> None:
        """n items, each with a retired-model row (swept later: holes) and a serving-model row, in random order."""
        items = [Item(external_id=f"x{self.n + j}", payload=b"x") for j in range(n)]
        self.n += n
        s.add_all(items)
        s.flush()
        rows = [
            {"item_id": it.id, "model_version": m, "vector": self.rng.normal(size=D).astype("<f4").tobytes()}
            for it in items
            for m in ("v1", "v2")
        ]
        order = self.rng.permutation(len(rows))
        s.execute(sa.insert(Embedding), [rows[i] for i in order])

    def apply(self, op: str, arg: int) -> None:
        if op == "insert":
            with self.sm() as s:
                self.write(s, arg)
                s.commit()
        elif op == "rollback":
            with self.sm() as s:
                self.write(s, arg)
                s.rollback()
        elif op == "open" and self.concurrent and len(self.open) < 3:
            s = self.sm()
            self.write(s, arg)
            self.open.append(s)
        elif op == "commit_open" and self.open:
            s = self.open.pop(arg % len(self.open))
            s.commit()
            s.close()
        elif op in ("sweep", "delete"):
            self.remove(op, arg)
        elif op == "sync":
            self.sync(arg)

    def remove(self, op: str, seed: int) -> None:
        g = np.random.default_rng(seed)
        with self.sm() as s:
            if op == "sweep":  # the retention sweep: the retired model's rows, any subset
                seqs = s.scalars(sa.select(Embedding.seq).where(Embedding.model_version == "v2")).all()
                gone = [q for q in seqs if g.random() < 0.7]
                s.execute(sa.delete(Embedding).where(Embedding.seq.in_(gone)))
                s.commit()
            else:
                live = s.scalars(sa.select(Item.external_id).where(Item.deleted_at.is_(None))).all()
                for ext in [e for e in live if g.random() < 0.2]:
                    delete_item(s, ext)

    def sync(self, batch: int) -> None:
        if self.follower is None:  # started mid-history, like an API restarted after a sweep
            self.follower = Follower(
                self.sm, self.manager, factory="Flat", use_gpu=False, batch_size=batch, poll_seconds=1.0,
                forward=lambda a, b, v: v,
            )  # fmt: skip
        self.follower.batch_size = batch
        self.follower.sync_once()
        assert self.indexed() == self.expected()

    def indexed(self) -> set[int]:
        ix = self.manager.current
        assert ix is not None and ix.new is not None and ix.old is None
        return ix.new.ids()

    def expected(self) -> set[int]:
        with self.sm() as s:
            q = (
                sa.select(Embedding.item_id)
                .join(Item)
                .where(Embedding.model_version == "v1", Item.deleted_at.is_(None))
            )
            return {int(i) for i in s.scalars(q)}

    def close(self) -> None:
        for s in self.open:
            s.rollback()
            s.close()
        self.engine.dispose()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=1, max_size=25))
def test_the_index_equals_the_table_after_every_cycle(database: str, ops: list[tuple[str, int]]) -> None:
    w = World(database)
    try:
        for op, arg in ops:
            w.apply(op, arg)
        while w.open:  # every late transaction finally commits: all of it must arrive
            w.apply("commit_open", 0)
        w.sync(7)
        w.sync(7)
        assert w.follower is not None and not w.follower.cursor.gaps  # nothing can fill them any more
    finally:
        w.close()
