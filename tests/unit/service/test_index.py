"""Index add/remove/replace/move, against brute force, for Flat, IVF and HNSW (tombstones)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import pytest

from service.index import IndexSet, Layout, RWLock, VectorIndex
from tests.helpers import wait_until

FACTORIES = ["Flat", "IVF4,Flat", "HNSW16"]


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _brute(ids: np.ndarray, vecs: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    d = ((q[:, None] - vecs[None]) ** 2).sum(-1)
    return ids[np.argsort(d, axis=1)[:, :k]]


@pytest.mark.parametrize("factory", FACTORIES)
def test_add_remove_replace(factory: str) -> None:
    rng = np.random.default_rng(0)
    ix = VectorIndex(8, factory, space="v1")
    ids = np.arange(100, 400, dtype=np.int64)
    vecs = _unit(rng, len(ids), 8)
    ix.add(ids, vecs)
    assert len(ix) == 300 and 100 in ix and 99 not in ix
    # An item's own vector finds it first.
    _, got = ix.search(vecs[:20], 1)
    if factory == "Flat":
        assert got[:, 0].tolist() == ids[:20].tolist()
    # Remove half; removed ids never come back, the rest stay findable.
    assert ix.remove(ids[::2]) == 150
    assert ix.remove(ids[::2]) == 0
    assert len(ix) == 150
    _, got = ix.search(vecs, 50)
    assert not set(got.ravel().tolist()) & set(ids[::2].tolist())
    # Replace (same id, new vector): the id appears once, at its new place.
    new_vec = _unit(rng, 1, 8)
    ix.add(ids[1:2], new_vec)
    assert len(ix) == 150
    _, got = ix.search(new_vec, 10)
    assert got[0].tolist().count(int(ids[1])) == 1
    # Re-adding a removed id (an abort moving items back) works for tombstone indices too.
    ix.add(ids[0:1], vecs[0:1])
    _, got = ix.search(vecs[0:1], 5)
    assert got[0].tolist().count(int(ids[0])) == 1


def test_flat_matches_brute_force_and_pads() -> None:
    rng = np.random.default_rng(1)
    ids = rng.permutation(10_000)[:500].astype(np.int64)
    vecs = _unit(rng, 500, 16)
    ix = VectorIndex(16)
    ix.add(ids, vecs)
    q = _unit(rng, 9, 16)
    d, got = ix.search(q, 10)
    assert (got == _brute(ids, vecs, q, 10)).all()
    assert np.all(np.diff(d, axis=1) >= 0)
    small = VectorIndex(16)
    small.add(ids[:3], vecs[:3])
    d, got = small.search(q, 5)
    assert (got[:, 3:] == -1).all() and np.isinf(d[:, 3:]).all()
    with pytest.raises(ValueError):
        ix.add(ids[:2], _unit(rng, 2, 8))  # a vector of another space's dimension


def test_hnsw_tombstones_compact() -> None:
    rng = np.random.default_rng(2)
    ix = VectorIndex(8, "HNSW16")
    ids = np.arange(3000, dtype=np.int64)
    vecs = _unit(rng, 3000, 8)
    ix.add(ids, vecs)
    ix.remove(ids[:1500])  # past the compaction threshold
    assert len(ix) == 1500 and len(ix._dead) == 0 and ix._index.ntotal == 1500
    _, got = ix.search(vecs[1500:1600], 1)
    assert (got[:, 0] == ids[1500:1600]).mean() > 0.95


def _pair(rng: np.random.Generator, n: int) -> tuple[IndexSet, np.ndarray, np.ndarray, np.ndarray]:
    layout = Layout(serving="v1", rollout_id=1, from_model="v1", to_model="v2", mode="reverse")
    ids = np.arange(1, n + 1, dtype=np.int64)
    old_vecs, new_vecs = _unit(rng, n, 8), _unit(rng, n, 12)
    s = IndexSet(layout, new=VectorIndex(12, space="v2"), old=VectorIndex(8, space="v1"))
    s.apply(to_old=(ids, old_vecs))
    return s, ids, old_vecs, new_vecs


def test_apply_moves_items_atomically() -> None:
    rng = np.random.default_rng(3)
    s, ids, old_vecs, new_vecs = _pair(rng, 200)
    assert s.sides() == {"new": 0, "old": 200} and s.backfilled_fraction() == 0.0
    assert s.apply(to_new=(ids[:50], new_vecs[:50])) == (50, 0)
    assert s.sides() == {"new": 50, "old": 150} and s.backfilled_fraction() == 0.25
    # A late OLD row for an item already in NEW is not added back to OLD.
    assert s.apply(to_old=(ids[:10], old_vecs[:10])) == (0, 0)
    assert s.side_of(int(ids[0])) == "new" and s.side_of(int(ids[100])) == "old"
    s.apply(remove=[int(ids[0]), int(ids[100])])
    assert s.side_of(int(ids[0])) is None and s.side_of(int(ids[100])) is None
    assert s.sides() == {"new": 49, "old": 149}


def test_every_item_found_exactly_once_while_moving() -> None:
    """Invariant 1 at the index level: readers search both sides while a writer moves batches from OLD
    to NEW; a query built from an item's own vectors must return that item exactly once, every time."""
    rng = np.random.default_rng(4)
    n = 2000
    s, ids, old_vecs, new_vecs = _pair(rng, n)
    stop = threading.Event()
    failures: list[str] = []
    searches = [0]

    def reader(seed: int) -> None:
        r = np.random.default_rng(seed)
        while not stop.is_set():
            j = r.integers(0, n, size=8)
            (_nd, ni), old = s.search(new_vecs[j], old_vecs[j], 5)
            _od, oi = old  # type: ignore[misc]
            for row, item in enumerate(ids[j]):
                found = ni[row].tolist().count(item) + oi[row].tolist().count(item)
                if found != 1:
                    failures.append(f"item {item} found {found} times")
            searches[0] += 1

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    order = rng.permutation(n)
    for b in range(0, n, 37):
        sel = order[b : b + 37]
        s.apply(to_new=(ids[sel], new_vecs[sel]))
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert searches[0] > 3
    assert s.sides() == {"new": n, "old": 0}


# RWLock. Each property is checked by something that a lock without it fails: a plain mutex fails
# `readers_share`, a no-op write() fails `held_read_lock_keeps_the_writer_out` and the stress test, and a
# read() that ignores waiting writers fails `waiting_writer_blocks_new_readers`. A negative ("X does not
# get in") can only be shown over a bounded wait: GRACE seconds, long for a thread that is free to run.
GRACE = 0.3


def _enter_in_thread(
    section: Callable[[], AbstractContextManager[None]], entered: threading.Event, order: list[str], name: str
) -> threading.Thread:
    def run() -> None:
        with section():
            order.append(name)
            entered.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_rwlock_readers_share() -> None:
    lock = RWLock()
    entered, order = threading.Event(), list[str]()
    with lock.read():
        t = _enter_in_thread(lock.read, entered, order, "second reader")
        assert entered.wait(5), "a second reader waited for the first one"
    t.join(5)


def test_rwlock_held_read_lock_keeps_the_writer_out_until_released() -> None:
    lock = RWLock()
    entered, order = threading.Event(), list[str]()
    with lock.read():
        t = _enter_in_thread(lock.write, entered, order, "writer")
        assert not entered.wait(GRACE), "the writer got in while a reader held the lock"
    assert entered.wait(5), "the writer never got in after the reader left"
    t.join(5)


def test_rwlock_held_write_lock_keeps_readers_and_writers_out() -> None:
    lock = RWLock()
    events, order = [threading.Event(), threading.Event()], list[str]()
    with lock.write():
        ts = [
            _enter_in_thread(lock.read, events[0], order, "reader"),
            _enter_in_thread(lock.write, events[1], order, "writer"),
        ]
        assert not events[0].wait(GRACE) and not events[1].is_set(), order
    assert events[0].wait(5) and events[1].wait(5), order
    for t in ts:
        t.join(5)


def test_rwlock_waiting_writer_blocks_new_readers() -> None:
    """Ingestion never starves: once a writer waits, a newly arriving reader queues behind it."""
    lock = RWLock()
    w_in, r_in, order = threading.Event(), threading.Event(), list[str]()
    with lock.read():
        w = _enter_in_thread(lock.write, w_in, order, "writer")
        wait_until(lambda: lock._writers_waiting == 1, timeout=5)  # the writer is parked in write()
        r = _enter_in_thread(lock.read, r_in, order, "late reader")
        assert not r_in.wait(GRACE), "a reader overtook the waiting writer"
    assert w_in.wait(5) and r_in.wait(5)
    assert order == ["writer", "late reader"]
    w.join(5)
    r.join(5)


def test_rwlock_stress_no_reader_ever_overlaps_a_writer() -> None:
    """Readers and writers hold the lock across a thread switch (time.sleep(0) gives up the GIL) and each
    checks, inside its section, who else is inside: under a broken lock the overlap shows up at once."""
    lock = RWLock()
    inside = {"readers": 0, "writers": 0}
    violations: list[str] = []
    guard = threading.Lock()

    def read() -> None:
        for _ in range(300):
            with lock.read():
                with guard:
                    inside["readers"] += 1
                    if inside["writers"]:
                        violations.append(f"reader inside with {inside['writers']} writer(s)")
                time.sleep(0)
                with guard:
                    if inside["writers"]:
                        violations.append("a writer came in while a reader was inside")
                    inside["readers"] -= 1

    def write() -> None:
        for _ in range(100):
            with lock.write():
                with guard:
                    inside["writers"] += 1
                    if inside["readers"] or inside["writers"] > 1:
                        violations.append(f"writer inside with {inside}")
                time.sleep(0)
                with guard:
                    if inside["readers"] or inside["writers"] > 1:
                        violations.append("someone came in while a writer was inside")
                    inside["writers"] -= 1

    ts = [threading.Thread(target=read) for _ in range(3)] + [threading.Thread(target=write) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts), "deadlock"
    assert not violations, violations[:5]
    assert inside == {"readers": 0, "writers": 0}


def test_ivf_is_exact_until_it_can_train_then_trains_on_everything_held() -> None:
    rng = np.random.default_rng(7)
    vi = VectorIndex(8, "IVF4,Flat")
    first = rng.standard_normal((100, 8)).astype(np.float32)
    vi.add(np.arange(100), first)
    assert vi.staged  # 100 < 4 lists x 39 points: still the exact staging index
    d, i = vi.search(first[:5], 3)
    assert i[:, 0].tolist() == list(range(5)) and np.allclose(d[:, 0], 0.0, atol=1e-5)

    more = rng.standard_normal((100, 8)).astype(np.float32)
    vi.add(np.arange(100, 200), more)
    assert not vi.staged and len(vi) == 200
    assert vi._index.ntotal == 200 and vi._index.nlist == 4  # trained with the configured nlist
    # every vector (from both adds) is found as its own nearest neighbour
    allv = np.concatenate([first, more])
    _, i = vi.search(allv, 1)
    assert i[:, 0].tolist() == list(range(200))
    vi.remove([0, 150])
    _, i = vi.search(allv[[0, 150]], 5)
    assert 0 not in i and 150 not in i


@pytest.mark.parametrize(
    ("factory", "params", "read"),
    [
        ("IVF4,Flat", "nprobe=3", lambda ix: ix.nprobe),
        ("HNSW16", "efSearch=77", lambda ix: ix.hnsw.efSearch),
    ],
)
def test_search_params_reach_the_ann_index(factory: str, params: str, read) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    vi = VectorIndex(8, factory, search_params=params)
    vi.add(np.arange(200), rng.standard_normal((200, 8)).astype(np.float32))
    assert read(vi._index) == int(params.split("=")[1])
