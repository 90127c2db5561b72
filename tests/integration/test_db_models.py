"""The ORM models round-trip on Postgres and on SQLite, constraints included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import BackfillTask, Embedding, Item, ModelVersion, Rollout, make_engine, make_sessionmaker
from service.db.migrate import upgrade_head

pytestmark = pytest.mark.integration


@pytest.fixture(params=["postgres", "sqlite"])
def session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    if request.param == "postgres":
        settings = Settings(database_url=request.getfixturevalue("pg"))
    else:
        settings = Settings(data_dir=tmp_path)
        upgrade_head(settings)
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        yield s
    engine.dispose()


def _seed(s: Session) -> Item:
    s.add_all(
        [
            ModelVersion(name="v1", dim=4, artifact_path="a/v1", checksum="x", status="serving"),
            ModelVersion(name="v2", dim=3, artifact_path="a/v2", checksum="y"),
        ]
    )
    item = Item(external_id="img-1", payload=b"\x89PNG...", label=3)
    s.add(item)
    s.commit()
    return item


def test_round_trip(session: Session) -> None:
    item = _seed(session)
    vec = np.arange(4, dtype=np.float32) / 7
    session.add(Embedding(item_id=item.id, model_version="v1", vector=vec.tobytes()))
    session.commit()
    session.expunge_all()

    got = session.scalars(sa.select(Embedding)).one()
    assert got.item_id == item.id and got.seq >= 1
    np.testing.assert_array_equal(np.frombuffer(got.vector, dtype=np.float32), vec)
    loaded = session.get(Item, item.id)
    assert loaded is not None and loaded.payload == b"\x89PNG..." and loaded.label == 3
    assert loaded.created_at is not None and loaded.deleted_at is None
    mv = session.get(ModelVersion, "v1")
    assert mv is not None and mv.status == "serving" and mv.manifest == {}


def test_embedding_unique_item_version(session: Session) -> None:
    item = _seed(session)
    session.add(Embedding(item_id=item.id, model_version="v1", vector=b"\0" * 16))
    session.commit()
    session.add(Embedding(item_id=item.id, model_version="v1", vector=b"\1" * 16))
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()
    # the same item in another space is fine
    session.add(Embedding(item_id=item.id, model_version="v2", vector=b"\0" * 12))
    session.commit()
    assert session.scalar(sa.select(sa.func.count()).select_from(Embedding)) == 2


def test_embedding_seq_increases(session: Session) -> None:
    _seed(session)
    items = [Item(external_id=f"i{n}", payload=b"p") for n in range(5)]
    session.add_all(items)
    session.commit()
    for it in items:
        session.add(Embedding(item_id=it.id, model_version="v1", vector=b"\0" * 16))
        session.commit()
    seqs = [e.seq for e in session.scalars(sa.select(Embedding).order_by(Embedding.item_id))]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5


def test_one_active_rollout(session: Session) -> None:
    _seed(session)
    kw = {"from_version": "v1", "to_version": "v2", "mode": "reverse", "policy": "uncertainty", "batch_size": 8}
    session.add(Rollout(**kw, active_lock=1))
    session.commit()
    session.add(Rollout(**kw, active_lock=1))
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()
    session.add(Rollout(**kw, status="aborted", active_lock=None))
    session.add(Rollout(**kw, status="completed", active_lock=None))
    session.commit()


def test_task_unique_and_state_check(session: Session) -> None:
    item = _seed(session)
    r = Rollout(from_version="v1", to_version="v2", mode="reverse", policy="fifo", batch_size=8)
    session.add(r)
    session.commit()
    session.add(BackfillTask(rollout_id=r.id, item_id=item.id, priority=1.0))
    session.commit()
    session.add(BackfillTask(rollout_id=r.id, item_id=item.id, priority=2.0))
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()
    task = session.scalars(sa.select(BackfillTask)).one()
    task.state = "bogus"
    with pytest.raises(IntegrityError):
        session.commit()
