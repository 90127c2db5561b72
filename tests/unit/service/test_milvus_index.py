"""The milvus index backend on a real milvus-lite (started in this process), against the FAISS Flat side on
the same vectors: same ids, same squared-L2 distances, through adds, replaces, removes and a backfill."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the milvus backend needs the `milvus` extra (pymilvus, milvus-lite)")

from pymilvus import MilvusException

from service import milvus_index
from service.config import Settings, SettingsError, check_startup
from service.index import IndexSet, Layout, VectorIndex
from service.index_backend import space_maker
from service.merge import merge_topk
from service.milvus_index import MilvusIndex, MilvusSpaces, SharedSpaces, collection_name
from service.rescore import ItemVectors

TOL = 1e-4  # float32 squared distances of unit-scale vectors, computed by two engines


@pytest.fixture(scope="module")
def spaces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusSpaces]:
    """One milvus-lite per module (its start is the slow part)."""
    made = MilvusSpaces(str(Path(tmp_path_factory.mktemp("milvus")) / "milvus.db"))
    yield made
    made.close()


def _vecs(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.normal(size=(n, d)).astype(np.float32)


def _engine_ids(side: MilvusIndex) -> set[int]:
    """What the collection itself holds (not the side's id bitmap)."""
    rows = side.client.query(side.collection, filter="id >= 0", output_fields=["id"], limit=16_384)
    return {int(r["id"]) for r in rows}


def assert_same_hits(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    """Equal distances within TOL; equal ids, except that two hits within TOL of each other may swap."""
    (gd, gi), (wd, wi) = got, want
    assert gd.shape == wd.shape and gi.shape == wi.shape
    np.testing.assert_array_equal(np.isinf(gd), np.isinf(wd))
    fin = np.isfinite(wd)
    np.testing.assert_allclose(gd[fin], wd[fin], rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(gi[~fin], -1)
    for row in range(gi.shape[0]):
        for col in np.flatnonzero(gi[row] != wi[row]):
            near = np.abs(wd[row] - wd[row, col]) <= TOL
            assert wi[row, col] in gi[row][near], (row, col, gi[row], wi[row])


@pytest.mark.parametrize("flush_rows", [milvus_index.FLUSH_ROWS, 64])
def test_same_results_as_faiss_flat_through_adds_replaces_removes(
    spaces: MilvusSpaces, flush_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With flushes every 64 rows, replaces and removes also reach rows already in sealed segments."""
    monkeypatch.setattr(milvus_index, "FLUSH_ROWS", flush_rows)
    rng = np.random.default_rng(0)
    d, k = 16, 10
    mv, fx = spaces(d, "v1"), VectorIndex(d, "Flat", space="v1")
    queries = _vecs(rng, 20, d)
    # Empty: all padding.
    assert_same_hits(mv.search(queries, k), fx.search(queries, k))

    ids = np.arange(5, 305, dtype=np.int64)
    vecs = _vecs(rng, ids.size, d)
    for side in (mv, fx):
        side.add(ids, vecs)
    assert len(mv) == len(fx) == 300 and 5 in mv and 4 not in mv
    assert_same_hits(mv.search(queries, k), fx.search(queries, k))
    assert_same_hits(mv.search(vecs[:7], 3), fx.search(vecs[:7], 3))  # self-queries

    # Replace some ids; a batch repeating an id keeps its last vector on both.
    rep_ids = np.concatenate([ids[:40], ids[:5]])
    rep_vecs = _vecs(rng, rep_ids.size, d)
    for side in (mv, fx):
        side.add(rep_ids, rep_vecs)
    assert len(mv) == len(fx) == 300
    assert_same_hits(mv.search(rep_vecs[-5:], k), fx.search(rep_vecs[-5:], k))
    assert_same_hits(mv.search(queries, k), fx.search(queries, k))

    # Remove a third (with absent ids mixed in): same counts, removed ids never returned.
    gone = np.concatenate([ids[::3], [10_000, 1]])
    assert mv.remove(gone) == fx.remove(gone) == 100
    assert mv.remove(gone) == 0
    assert len(mv) == len(fx) == 200 and _engine_ids(mv) == fx.ids() == mv.ids()
    got = mv.search(queries, k)
    assert not set(got[1].ravel().tolist()) & set(ids[::3].tolist())
    assert_same_hits(got, fx.search(queries, k))

    # Re-add removed ids (an abort moving items back), then ask for more than are held: padded alike.
    for side in (mv, fx):
        side.add(ids[:30:3], vecs[:30:3])
    assert_same_hits(mv.search(queries, 250), fx.search(queries, 250))
    assert _engine_ids(mv) == fx.ids()
    mv.close()


def test_space_is_stamped_on_its_collection(spaces: MilvusSpaces) -> None:
    side = spaces(4, "v1->v2")
    info = side.client.describe_collection(side.collection)
    assert info["properties"]["space"] == "v1->v2"
    assert side.collection.startswith("backfill_v1__v2_")
    side.close()
    assert not side.client.has_collection(side.collection)


def _sets(spaces: MilvusSpaces, d_old: int, d_new: int, rescore: bool) -> tuple[IndexSet, IndexSet]:
    layout = Layout(serving="v1", rollout_id=1, from_model="v1", to_model="v2", mode="reverse")

    def store() -> ItemVectors | None:
        return ItemVectors(d_new) if rescore else None

    depth = 3 if rescore else 0
    mv = IndexSet(
        layout, new=spaces(d_new, "v2"), old=spaces(d_old, "v1"), rescore_vectors=store(), rescore_depth=depth
    )
    fx = IndexSet(
        layout,
        new=VectorIndex(d_new, space="v2"),
        old=VectorIndex(d_old, space="v1"),
        rescore_vectors=store(),
        rescore_depth=depth,
    )
    return mv, fx


@pytest.mark.parametrize("rescore", [False, True])
def test_backfill_keeps_every_item_on_one_side_and_matches_faiss(spaces: MilvusSpaces, rescore: bool) -> None:
    """A simulated backfill in batches (with deletes on the way): after each batch every live item is on
    exactly one side, in the engine itself, and found first by its own vectors; both sides' hits and the
    merged top-k equal the FAISS-backed set's."""
    rng = np.random.default_rng(1 if rescore else 2)
    n, d_old, d_new, k = 240, 8, 12, 5
    ids = np.arange(1, n + 1, dtype=np.int64)
    old_vecs, new_vecs = _vecs(rng, n, d_old), _vecs(rng, n, d_new)
    h_old = new_vecs.copy()  # h(v1) of the re-scoring store: a perfect h, so an item still finds itself first
    mv, fx = _sets(spaces, d_old, d_new, rescore)
    for s in (mv, fx):
        s.apply(to_old=(ids, old_vecs), old_rescore=h_old if rescore else None)
    live = set(ids.tolist())
    for step, batch in enumerate(np.array_split(rng.permutation(n), 6)):
        for s in (mv, fx):
            assert s.apply(to_new=(ids[batch], new_vecs[batch])) == (batch.size, 0)
            if step == 2:  # a late OLD row for a moved item is not added back; a delete leaves both sides
                assert s.apply(to_old=(ids[batch[:3]], old_vecs[batch[:3]]), old_rescore=h_old[batch[:3]])[1] == 0
                s.apply(remove=ids[batch[3:5]])
        if step == 2:
            live -= set(ids[batch[3:5]].tolist())
        assert mv.new is not None and mv.old is not None and isinstance(mv.new, MilvusIndex)
        in_new, in_old = _engine_ids(mv.new), _engine_ids(mv.old)  # type: ignore[arg-type]
        assert not in_new & in_old and in_new | in_old == live
        assert mv.sides() == fx.sides() and mv.backfilled_fraction() == fx.backfilled_fraction()

        rows = np.array(sorted(live), dtype=np.int64) - 1
        got, want = mv.search(new_vecs[rows], old_vecs[rows], k), fx.search(new_vecs[rows], old_vecs[rows], k)
        assert_same_hits(got[0], want[0])
        assert got[1] is not None and want[1] is not None
        assert_same_hits(got[1], want[1])
        merged = merge_topk(*got[0], *got[1], k)
        expected = merge_topk(*want[0], *want[1], k)
        for item, m_row, f_row in zip(rows + 1, merged, expected, strict=True):
            assert m_row[0].item_id == item  # its own vectors find it first (distance 0 on its side)
            np.testing.assert_allclose([h.distance for h in m_row], [h.distance for h in f_row], rtol=TOL, atol=TOL)
            assert {h.item_id for h in m_row} == {h.item_id for h in f_row} or _near_tie(m_row, f_row)
    assert mv.sides() == {"new": len(live), "old": 0}
    for side in (mv.new, mv.old):
        assert side is not None
        side.close()


def _near_tie(a: list, b: list) -> bool:
    """The k-th hits differ only where their distances tie within TOL."""
    return abs(a[-1].distance - b[-1].distance) <= TOL


def test_the_setting_picks_the_backend(tmp_path: Path) -> None:
    assert space_maker(Settings(data_dir=tmp_path)) is None  # FAISS: the follower's own VectorIndex
    chosen = Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path, index_backend="milvus")
    made = space_maker(chosen)
    assert isinstance(made, SharedSpaces) and made.uri == str(tmp_path / "data" / "milvus.db")
    made.close()
    check_startup(chosen)
    with pytest.raises(SettingsError, match="BACKFILL_INDEX_FACTORY='IVF64,Flat'"):
        check_startup(chosen.model_copy(update={"index_factory": "IVF64,Flat"}))


def test_concurrent_readers_find_every_item_exactly_once(spaces: MilvusSpaces) -> None:
    """Invariant 1 with readers on other threads sharing the client: while a writer moves batches OLD -> NEW,
    a query built from an item's own vectors returns that item exactly once, every time."""
    rng = np.random.default_rng(5)
    n = 200
    ids = np.arange(1, n + 1, dtype=np.int64)
    old_vecs, new_vecs = _vecs(rng, n, 8), _vecs(rng, n, 12)
    s, _ = _sets(spaces, 8, 12, rescore=False)
    s.apply(to_old=(ids, old_vecs))
    stop = threading.Event()
    failures: list[str] = []
    searches = [0]

    def reader(seed: int) -> None:
        g = np.random.default_rng(seed)
        while not stop.is_set():
            j = g.integers(0, n, size=8)
            (_nd, ni), old = s.search(new_vecs[j], old_vecs[j], 3)
            assert old is not None
            for row, item in enumerate(ids[j]):
                found = ni[row].tolist().count(item) + old[1][row].tolist().count(item)
                if found != 1:
                    failures.append(f"item {item} found {found} times")
            searches[0] += 1

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for batch in np.array_split(rng.permutation(n), 8):
        s.apply(to_new=(ids[batch], new_vecs[batch]))
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert searches[0] > 3 and s.sides() == {"new": n, "old": 0}
    for side in (s.new, s.old):
        assert side is not None
        side.close()


def test_a_failed_delete_from_old_leaves_the_moved_item_in_new(spaces: MilvusSpaces) -> None:
    """Insert before delete: OLD's collection is gone (the engine fails the delete), the move of an item to
    NEW raises, and the item is in NEW's collection all the same, never on neither side."""
    rng = np.random.default_rng(6)
    ids = np.arange(1, 11, dtype=np.int64)
    s, _ = _sets(spaces, 8, 12, rescore=False)
    s.apply(to_old=(ids, _vecs(rng, 10, 8)))
    assert isinstance(s.old, MilvusIndex) and isinstance(s.new, MilvusIndex)
    s.old.client.drop_collection(s.old.collection)
    with pytest.raises(MilvusException):
        s.apply(to_new=(ids[:3], _vecs(rng, 3, 12)))
    assert _engine_ids(s.new) == {1, 2, 3}
    s.new.close()


def test_shared_collections_outlive_their_side_and_refuse_another_space(spaces: MilvusSpaces) -> None:
    """A shared side opens the space's stable collection (what a previous writer left is still there), a
    reader's side writes nothing, closing drops nothing, and a collection stamped with another space is
    refused."""
    shared = SharedSpaces.__new__(SharedSpaces)  # the module's milvus-lite: one server per file
    shared.uri, shared.prefix, shared.client, shared.writes = spaces.uri, "shared_t", spaces.client, True
    rng = np.random.default_rng(8)
    vecs = _vecs(rng, 20, 6)
    first = shared(6, "v1")
    first.add(np.arange(20), vecs)
    first.stamp("layout-a")
    first.close()
    assert shared.stamped("v1") == "layout-a" and shared.stamped("v9") is None
    shared.writes = False
    reader = shared(6, "v1")
    assert reader.collection == first.collection == collection_name("shared_t", "v1") and len(reader) == 0
    reader.add(np.arange(20, 25), _vecs(rng, 5, 6))  # a reader: its bitmap only
    assert len(reader) == 5 and set(reader.engine_ids().tolist()) == set(range(20))
    fx = VectorIndex(6, space="v1")
    fx.add(np.arange(20), vecs)
    assert_same_hits(reader.search(vecs[:4], 7), fx.search(vecs[:4], 7))  # the engine's hits, not the bitmap's
    d, i, v = reader.search_vectors(vecs[:4], 3)
    assert_same_hits((d, i), fx.search(vecs[:4], 3))
    np.testing.assert_array_equal(v, vecs[i])  # each hit's stored vector
    assert collection_name("p", "v1->v2") != collection_name("p", "v1__v2")
    spaces.client.create_collection(collection_name("shared_t", "v2"), dimension=6, properties={"space": "other"})
    with pytest.raises(RuntimeError, match="holds space 'other'"):
        shared(6, "v2")
    for name in (first.collection, collection_name("shared_t", "v2")):
        spaces.client.drop_collection(name)


def test_reconciliation_writes_only_what_differs_and_deletes_last(spaces: MilvusSpaces) -> None:
    """Between begin and finish, an add writes only missing or different rows and removes wait; finish
    deletes what the collection held that was not added again, and counts each kind of repair."""
    shared = SharedSpaces.__new__(SharedSpaces)
    shared.uri, shared.prefix, shared.client, shared.writes = spaces.uri, "recon_t", spaces.client, True
    rng = np.random.default_rng(9)
    vecs = _vecs(rng, 30, 5)
    side = shared(5, "v1")
    side.add(np.arange(30), vecs)  # the engine: 0-29
    side = shared(5, "v1")  # a new writer: empty bitmap, same collection
    side.begin_reconcile()
    truth = vecs.copy()
    truth[3] += 1.0  # Postgres says another vector for 3
    side.add(np.arange(25), truth[:25])  # Postgres: 0-24 (25-29 are extras)
    side.add([40, 41], _vecs(rng, 2, 5))  # missing in the engine
    side.remove([0])  # moved away: deleted at finish, not now
    assert 0 in side.engine_ids().tolist()
    repairs = side.finish_reconcile()
    assert repairs == {"inserted": 2, "replaced": 1, "deleted": 6}
    held = side.engine_ids()
    assert set(held.tolist()) == set(range(1, 25)) | {40, 41}
    np.testing.assert_allclose(side.fetch(np.array([3]))[3], truth[3])
    spaces.client.drop_collection(side.collection)


def test_unused_shared_collections_are_marked_then_dropped_after_the_grace(spaces: MilvusSpaces) -> None:
    """A space no layout uses is marked at the first call and dropped only by a call `grace` seconds later;
    one used again meanwhile is unmarked and kept; another process's per-process collection of the same
    prefix is never touched."""
    shared = SharedSpaces.__new__(SharedSpaces)
    shared.uri, shared.prefix, shared.client, shared.writes = spaces.uri, "retire_t", spaces.client, True
    rng = np.random.default_rng(10)
    for space in ("v1", "v2", "v1->v2"):
        shared(4, space).add(np.arange(3), _vecs(rng, 3, 4))
    private = MilvusSpaces.__new__(MilvusSpaces)
    private.uri, private.prefix, private.client, private._serial = spaces.uri, "retire_t", spaces.client, iter([7])
    other = private(4, "v1")  # retire_t_v1_<pid>_7: not a shared collection
    names = {s: collection_name("retire_t", s) for s in ("v1", "v2", "v1->v2")}

    def present() -> set[str]:
        return {n for n in spaces.client.list_collections() if n.startswith("retire_t_")}

    assert shared.retire_unused(["v2"], grace_seconds=60, now=1000.0) == []  # v1 and v1->v2 marked
    assert shared.retire_unused(["v2", "v1"], grace_seconds=60, now=1030.0) == []  # v1 used again: unmarked
    assert present() == {*names.values(), other.collection}
    dropped = shared.retire_unused(["v2"], grace_seconds=60, now=1061.0)
    assert dropped == [names["v1->v2"]]  # marked at 1000; v1 was re-marked at 1061, not yet due
    assert present() == {names["v1"], names["v2"], other.collection}
    assert shared.retire_unused(["v2"], grace_seconds=60, now=1121.0) == [names["v1"]]
    assert present() == {names["v2"], other.collection}
    assert len(shared(4, "v2").engine_ids()) == 3  # the kept one still holds its rows
    for name in present():
        spaces.client.drop_collection(name)


def test_the_id_scan_reads_the_collection_in_chunks(spaces: MilvusSpaces, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reconciliation's id scan reads chunk by chunk (7 rows per chunk here): every id, once."""
    monkeypatch.setattr(milvus_index, "WRITE_CHUNK", 7)
    side = spaces(4, "v1")
    ids = np.arange(0, 90, 3)
    side.add(ids, _vecs(np.random.default_rng(11), ids.size, 4))
    chunks = list(side.engine_id_chunks())
    assert len(chunks) >= 5 and max(c.size for c in chunks) <= 7
    got = side.engine_ids()
    assert got.size == ids.size and set(got.tolist()) == set(ids.tolist())
    side.close()
