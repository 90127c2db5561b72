"""The shared Milvus index (milvus backend) on a real milvus-lite server reached by URI: one writer, readers
that only search, the reconciliation, and a writer killed between the Postgres commit and its Milvus delete.

Every comparison is against an independent computation: a FAISS follower on the same Postgres, and what the
embeddings table itself holds."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

pytest.importorskip("pymilvus", reason="the milvus backend needs the `milvus` extra (pymilvus, milvus-lite)")

from service.config import Settings
from service.db.models import Embedding, Item, Rollout
from service.gallery import delete_item
from service.index import IndexSet
from service.index_writer import WriterLease
from service.ingest import Follower, layout_key, read_layout
from service.merge import merge_topk
from service.metrics import INDEX_RECONCILE_REPAIRS
from service.milvus_index import ID, RETIRED_AT, VEC, SharedSpaces, collection_name
from tests.helpers import wait_until
from tests.integration.milvus_procs import milvus_lite_server, spawn_writer, stop
from tests.integration.test_ingest import (
    D1,
    add_items,
    follower,
    reverse_rollout,
    to_new_space,
    unit,
    with_models,
)
from tests.integration.test_ingest_milvus import _same
from tests.unit.service.test_milvus_index import TOL

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with milvus_lite_server(Path(tmp_path_factory.mktemp("milvus-server"))) as uri:
        yield uri


@pytest.fixture
def sm(settings: Settings) -> Iterator[sessionmaker[Session]]:
    yield from with_models(settings)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"  # this test's own collections on the module's server


def collection(spaces: SharedSpaces, space: str) -> dict[int, np.ndarray]:
    """What a space's collection itself holds: id -> vector."""
    name = collection_name(spaces.prefix, space)
    if not spaces.client.has_collection(name):
        return {}
    it = spaces.client.query_iterator(name, batch_size=1000, filter=f"{ID} >= 0", output_fields=[ID, VEC])
    out: dict[int, np.ndarray] = {}
    try:
        while rows := it.next():
            out.update((int(r[ID]), np.asarray(r[VEC], np.float32)) for r in rows)
    finally:
        it.close()
    return out


def postgres_sides(sm: sessionmaker[Session]) -> dict[str, dict[int, np.ndarray]]:
    """What Postgres says each side holds under the current layout (docs/rollout-semantics.md), with vectors."""
    with sm() as s:
        layout = read_layout(s)
        rows = s.execute(
            sa.select(Embedding.item_id, Embedding.model_version, Embedding.vector)
            .join(Item, Item.id == Embedding.item_id)
            .where(Item.deleted_at.is_(None))
        ).all()
    by_model: dict[str, dict[int, np.ndarray]] = {}
    for item, model, vec in rows:
        by_model.setdefault(model, {})[int(item)] = np.frombuffer(vec, "<f4")
    new = by_model.get(str(layout.new_model), {})
    if not layout.in_rollout:
        return {str(layout.new_space): new}
    old = {i: v for i, v in by_model.get(str(layout.from_model), {}).items() if i not in new}
    return {str(layout.new_space): new, str(layout.old_space): old}


def assert_collections_hold_postgres(sm: sessionmaker[Session], spaces: SharedSpaces) -> None:
    """Invariant 1 in the engine itself: every live item in exactly one of the layout's collections, with
    Postgres's vector, and nothing else there."""
    want = postgres_sides(sm)
    held = {space: collection(spaces, space) for space in want}
    for space, rows in want.items():
        assert set(held[space]) == set(rows), space
        for i, v in rows.items():
            np.testing.assert_allclose(held[space][i], v, rtol=1e-6, atol=1e-7)
    sides = list(held.values())
    if len(sides) == 2:
        assert not set(sides[0]) & set(sides[1])


def same_merged(mv: IndexSet | None, fx: IndexSet | None, q_new: np.ndarray, q_old: np.ndarray) -> None:
    """Both sides' hits equal the FAISS set's (`_same`), and so does the merged top-k: same ids (but for
    ties within float tolerance), same distances."""
    assert mv is not None and fx is not None
    _same(mv, fx, q_new, q_old)
    k = 5
    got, want = mv.search(q_new, q_old, k), fx.search(q_new, q_old, k)
    merged = merge_topk(*got[0], *(got[1] or (None, None)), k)
    expected = merge_topk(*want[0], *(want[1] or (None, None)), k)
    for m_row, f_row in zip(merged, expected, strict=True):
        np.testing.assert_allclose([h.distance for h in m_row], [h.distance for h in f_row], rtol=TOL, atol=TOL)
        ties = {h.item_id for h in f_row if abs(h.distance - f_row[-1].distance) <= TOL}
        assert {h.item_id for h in m_row} - ties == {h.item_id for h in f_row} - ties


def repairs(side: str, action: str, reason: str) -> float:
    return INDEX_RECONCILE_REPAIRS.labels(side=side, action=action, reason=reason)._value.get()


def _seed(sm: sessionmaker[Session], n: int, seed: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v1 = unit(rng, n, D1)
    v2 = to_new_space("v1", "v2", v1) + 0.05 * rng.normal(size=(n, 12)).astype(np.float32)
    with sm() as s:
        ids = add_items(s, n, v1, "m")
        s.add(reverse_rollout())
        s.commit()
    return ids, v1, v2


def _backfill(sm: sessionmaker[Session], ids: list[int], v2: np.ndarray, rows: np.ndarray) -> None:
    with sm() as s:
        s.execute(
            sa.insert(Embedding),
            [{"item_id": ids[j], "model_version": "v2", "vector": v2[j].tobytes()} for j in rows],
        )
        s.commit()


def _shared(sm: sessionmaker[Session], uri: str, prefix: str) -> Follower:
    return follower(sm, batch_size=40, make_space=SharedSpaces(uri, prefix=prefix))[0]


def test_one_writer_readers_search_the_shared_collections_like_faiss(
    sm: sessionmaker[Session], milvus_uri: str, prefix: str
) -> None:
    """A reader is not ready before a writer has reconciled its layout, keeps serving the previous layout until
    the writer has stamped the next one, and from then on its hits (and the writer's) equal a FAISS
    follower's on the same Postgres, through a backfill in batches, a delete and an abort; the collections
    hold exactly what Postgres says after every writer cycle; a reader takes over when the writer stops."""
    n = 150
    ids, v1, v2 = _seed(sm, n, 7)
    writer, reader = _shared(sm, milvus_uri, prefix), _shared(sm, milvus_uri, prefix)
    ref, ref_manager = follower(sm, backend="faiss", batch_size=40)
    someone = WriterLease(sm.kw["bind"], prefix)  # a writer that has not reconciled anything yet
    assert someone.held()
    reader.sync_once()
    assert not reader.ready.is_set() and reader.manager.current is None
    someone.release()
    for f in (writer, reader, ref):
        f.sync_once()
    assert writer.make_space.writes and not reader.make_space.writes  # type: ignore[attr-defined]
    assert reader.ready.is_set()
    spaces: SharedSpaces = writer.make_space  # type: ignore[assignment]
    assert_collections_hold_postgres(sm, spaces)
    for f in (writer, reader):
        same_merged(f.manager.current, ref_manager.current, v2, v1)

    order = np.random.default_rng(8).permutation(n)
    for b in range(0, n, 50):
        _backfill(sm, ids, v2, order[b : b + 50])
        if b == 50:
            with sm() as s:
                delete_item(s, "m3")
        for f in (writer, reader, ref):
            f.sync_once()
        assert_collections_hold_postgres(sm, spaces)
        for f in (writer, reader):
            same_merged(f.manager.current, ref_manager.current, v2, v1)

    # Abort: v1 alone again. The reader keeps the rollout's layout until the writer has put every item back.
    with sm() as s:
        s.execute(sa.update(Rollout).values(status="aborted", active_lock=None))
        s.commit()
        layout = read_layout(s)
    before = repairs("new", "inserted", "layout")
    during: IndexSet | None = reader.manager.current
    reader.sync_once()
    assert reader.manager.current is during and reader.ready.is_set()
    writer.sync_once()
    assert spaces.stamped("v1") == layout_key(layout)
    retired = {sp: spaces.client.describe_collection(collection_name(prefix, sp))["properties"] for sp in ("v1", "v2")}
    assert float(retired["v2"][RETIRED_AT]) > 0  # unused since the abort: marked, dropped a reconcile period later
    assert float(retired["v1"].get(RETIRED_AT) or 0) == 0
    assert repairs("new", "inserted", "layout") - before == n - 1  # every live item back into v1's collection
    for f in (reader, ref):
        f.sync_once()
    assert reader.manager.current is not during and reader.manager.current.layout == layout  # type: ignore[union-attr]
    assert_collections_hold_postgres(sm, spaces)
    for f in (writer, reader):
        same_merged(f.manager.current, ref_manager.current, v1, v1)  # v1 serves alone

    writer.stop()  # its lease goes with it: the reader takes over and reconciles (nothing to repair)
    reader.sync_once()
    assert reader.make_space.writes  # type: ignore[attr-defined]
    same_merged(reader.manager.current, ref_manager.current, v1, v1)
    reader.stop()


def test_a_writer_killed_between_the_new_insert_and_the_old_delete_is_repaired(
    sm: sessionmaker[Session], settings: Settings, milvus_uri: str, prefix: str
) -> None:
    """A writer process SIGKILLs itself after upserting a moving batch into NEW and before deleting it from
    OLD (the Postgres commit is visible). The batch is then on both sides (never on neither) and a reader
    still finds each item once; the next writer's reconciliation at start deletes the OLD copies, counts
    them, and leaves every live item in exactly one collection with Postgres's vector."""
    n, moved = 60, 20
    ids, v1, v2 = _seed(sm, n, 11)
    spaces = SharedSpaces(milvus_uri, prefix=prefix)
    victim = spawn_writer(settings.sqlalchemy_url, milvus_uri, prefix, fault="kill-before-old-delete")
    try:
        with sm() as s:
            key = layout_key(read_layout(s))
        wait_until(
            lambda: spaces.stamped("v1") == key and spaces.stamped("v2") == key,
            timeout=120,
            interval=0.1,
            message=lambda: victim.stderr.read().decode() if victim.poll() is not None and victim.stderr else "",
        )
        assert_collections_hold_postgres(sm, spaces)
        _backfill(sm, ids, v2, np.arange(moved))
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        stop(victim)
    in_new, in_old = collection(spaces, "v2"), collection(spaces, "v1")
    both = set(in_new) & set(in_old)
    assert both == {ids[j] for j in range(moved)}  # the crash left the batch on both sides, none on neither
    assert set(in_new) | set(in_old) == set(ids)

    # Before anyone repairs it, a reader already finds every item exactly once: the merge drops the copy.
    blocker = WriterLease(sm.kw["bind"], prefix)  # the lease, taken by a writer that has not reconciled yet
    assert blocker.held()
    reader = _shared(sm, milvus_uri, prefix)
    reader.sync_once()
    assert reader.ready.is_set() and not reader.make_space.writes  # type: ignore[attr-defined]
    ix = reader.manager.current
    assert ix is not None
    (nd, ni), old = ix.search(v2, v1, 3)
    assert old is not None
    for row, merged in enumerate(merge_topk(nd, ni, old[0], old[1], 3)):
        assert [h.item_id for h in merged].count(ids[row]) == 1
    reader.stop()
    blocker.release()

    before = repairs("old", "deleted", "start")
    survivor = _shared(sm, milvus_uri, prefix)
    survivor.sync_once()
    assert survivor.make_space.writes  # type: ignore[attr-defined]
    assert repairs("old", "deleted", "start") - before == moved
    assert_collections_hold_postgres(sm, spaces)
    ref, ref_manager = follower(sm, backend="faiss", batch_size=40)
    ref.sync_once()
    same_merged(survivor.manager.current, ref_manager.current, v2, v1)
    survivor.stop()
    spaces.close()


def test_sqlite_single_process_is_the_writer(tmp_path: Path, milvus_uri: str, prefix: str) -> None:
    """The embedded mode: on SQLite the one process writes the shared collections, with no lock to take."""
    from service.db.migrate import upgrade_head

    settings = Settings(data_dir=tmp_path / "data")
    upgrade_head(settings)
    for sm in with_models(settings):
        _seed(sm, 30, 3)
        f = _shared(sm, milvus_uri, prefix)
        f.sync_once()
        assert f.ready.is_set() and f.make_space.writes  # type: ignore[attr-defined]
        assert_collections_hold_postgres(sm, f.make_space)  # type: ignore[arg-type]
        f.stop()
