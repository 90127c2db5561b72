"""The follower with the milvus backend (a real milvus-lite) beside one with FAISS, on the same Postgres:
the same sides and hits through a rebuild, a backfill in batches and deletes; a retired layout's collections
are dropped one swap later, and the rest at stop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

pytest.importorskip("pymilvus", reason="the milvus backend needs the `milvus` extra (pymilvus, milvus-lite)")

from service.config import Settings
from service.db.models import Embedding, ModelVersion, Rollout
from service.gallery import delete_item
from service.index import IndexSet
from service.milvus_index import MilvusIndex, MilvusSpaces, connect
from tests.integration.test_ingest import (
    D1,
    add_items,
    follower,
    reverse_rollout,
    to_new_space,
    unit,
    with_models,
)
from tests.unit.service.test_milvus_index import assert_same_hits

pytestmark = pytest.mark.integration


@pytest.fixture
def sm(settings: Settings) -> Iterator[sessionmaker[Session]]:
    yield from with_models(settings)


def _same(mv: IndexSet, fx: IndexSet, q_new: np.ndarray, q_old: np.ndarray) -> None:
    assert mv.sides() == fx.sides()
    for side in ("new", "old"):
        a, b = getattr(mv, side), getattr(fx, side)
        assert (a is None) == (b is None) and (a is None or a.ids() == b.ids())
    got, want = mv.search(q_new, q_old, 5), fx.search(q_new, q_old, 5)
    assert_same_hits(got[0], want[0])
    assert (got[1] is None) == (want[1] is None)
    if got[1] is not None and want[1] is not None:
        assert_same_hits(got[1], want[1])


def test_milvus_follower_matches_faiss_follower(sm: sessionmaker[Session], tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n = 150
    v1 = unit(rng, n, D1)
    v2 = to_new_space("v1", "v2", v1) + 0.05 * rng.normal(size=(n, 12)).astype(np.float32)
    with sm() as s:
        ids = add_items(s, n, v1, "m")
        s.add(reverse_rollout())
        s.commit()
    spaces = MilvusSpaces(str(tmp_path / "milvus.db"))
    fm, manager_m = follower(sm, batch_size=40, make_space=spaces)
    ff, manager_f = follower(sm, backend="faiss", batch_size=40)
    for f in (fm, ff):
        f.sync_once()
    first = manager_m.current
    assert first is not None and isinstance(first.old, MilvusIndex) and first.sides() == {"new": 0, "old": n}
    _same(first, manager_f.current, v2, v1)  # type: ignore[arg-type]

    order = rng.permutation(n)
    for b in range(0, n, 50):
        with sm() as s:
            s.execute(
                sa.insert(Embedding),
                [{"item_id": ids[j], "model_version": "v2", "vector": v2[j].tobytes()} for j in order[b : b + 50]],
            )
            s.commit()
        if b == 50:
            with sm() as s:
                delete_item(s, "m3")
        for f in (fm, ff):
            f.sync_once()
        _same(first, manager_f.current, v2, v1)  # type: ignore[arg-type]
    assert first.sides() == {"new": n - 1, "old": 0}

    # Completion: v2 serving, no rollout -> a rebuild; the first layout's collections stay until the next swap.
    with sm() as s:
        s.execute(sa.update(Rollout).values(status="completed", active_lock=None))
        s.execute(
            sa.update(ModelVersion).values(status=sa.case((ModelVersion.name == "v2", "serving"), else_="retired"))
        )
        s.commit()
    for f in (fm, ff):
        f.sync_once()
    second = manager_m.current
    assert second is not None and second is not first and second.old is None
    _same(second, manager_f.current, v2, v1)  # type: ignore[arg-type]
    first_names = [side.collection for side in (first.new, first.old) if isinstance(side, MilvusIndex)]
    assert all(spaces.client.has_collection(c) for c in first_names)
    fm.rebuild(second.layout)  # another swap: the first layout's collections are dropped now
    assert not any(spaces.client.has_collection(c) for c in first_names)
    third = manager_m.current
    assert third is not None and isinstance(third.new, MilvusIndex)
    _same(third, manager_f.current, v2, v1)  # type: ignore[arg-type]

    fm.stop()  # drops the current and the retired layouts' collections, and stops milvus-lite
    reopened = connect(spaces.uri)
    try:
        assert reopened.list_collections() == []
    finally:
        reopened.close()
