"""service/rescore.py and the re-scored reverse path of `IndexSet`: against brute force and the offline
harness's own re-scoring (models/evaluate.py), which shares no code with it."""

from __future__ import annotations

import numpy as np
import pytest

from models import evaluate as E
from service.index import IndexSet, Layout, VectorIndex
from service.rescore import ItemVectors, rescore


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_item_vectors_add_replace_remove_and_compact() -> None:
    rng = np.random.default_rng(0)
    store, truth = ItemVectors(4), {}
    for step in range(60):
        ids = rng.integers(0, 300, size=int(rng.integers(1, 40)))
        if step % 3 == 2:
            store.remove(ids)
            for i in ids:
                truth.pop(int(i), None)
        else:
            vecs = rng.normal(size=(len(ids), 4)).astype(np.float32)
            store.add(ids, vecs)
            for i, v in zip(ids, vecs, strict=True):  # the last vector of a repeated id wins
                truth[int(i)] = v
        assert len(store) == len(truth)
    probe = np.array([[-1, 0, 5, 299], [1000, 7, 7, 3]])
    vecs, held = store.take(probe)
    for idx in np.ndindex(probe.shape):
        i = int(probe[idx])
        assert held[idx] == (i in truth)
        assert np.array_equal(vecs[idx], truth[i] if i in truth else np.zeros(4, np.float32))


def test_rescore_is_the_sorted_candidates_by_distance() -> None:
    rng = np.random.default_rng(1)
    store = ItemVectors(6)
    ids = np.arange(50, dtype=np.int64)
    vecs = _unit(rng, 50, 6)
    store.add(ids[:40], vecs[:40])  # 40..49 are not held: dropped from the answer
    q = _unit(rng, 3, 6)
    cand = np.array([rng.permutation(50)[:12] for _ in range(3)])
    cand[0, 0] = -1
    d, got = rescore(q, cand, store, 5)
    for r in range(3):
        c = [int(i) for i in cand[r] if 0 <= i < 40]
        dist = {i: float(((vecs[i] - q[r]) ** 2).sum()) for i in c}
        expect = sorted(c, key=lambda i: dist[i])[:5]
        assert got[r].tolist() == expect + [-1] * (5 - len(expect))
        assert np.allclose(d[r][: len(expect)], [dist[i] for i in expect], atol=1e-5)


@pytest.mark.parametrize("moved", [0, 30, 150])
def test_reverse_index_set_equals_the_harness(moved: int) -> None:
    """OLD's answer on the re-scored reverse path, through IndexSet, = models.evaluate's old_side."""
    rng = np.random.default_rng(2)
    n, k, depth = 200, 10, 3
    ids = np.arange(n, dtype=np.int64)
    v1, v2 = _unit(rng, n, 8), _unit(rng, n, 12)
    h_v1 = _unit(rng, n, 12)
    q_new, q_psi = _unit(rng, 7, 12), _unit(rng, 7, 8)
    layout = Layout(serving="v1", rollout_id=1, from_model="v1", to_model="v2", mode="reverse")
    s = IndexSet(layout, new=VectorIndex(12), old=VectorIndex(8), rescore_vectors=ItemVectors(12), rescore_depth=depth)
    s.apply(to_old=(ids, v1), old_rescore=h_v1)
    s.apply(to_new=(ids[:moved], v2[:moved]))
    _, (d, got) = s.search(q_new, q_psi, k)

    # The harness searches a gallery = queries set; append the queries as extra rows outside OLD.
    labels = np.zeros(n + 7, np.int64)
    space = E.Space(
        np.vstack([v1, np.zeros((7, 8), np.float32)]),
        np.vstack([np.zeros((n, 8), np.float32), q_psi]),
        E._identity,
        E.Rescore(np.vstack([h_v1, np.zeros((7, 12), np.float32)]), np.vstack([v2, q_new]), E._identity, depth),
    )
    ev = E.Evaluator(labels, np.vstack([v2, q_new]), {"reverse": space}, k, cache_k=n + 6)
    members = np.zeros(n + 7, bool)
    members[moved:n] = True
    d_ref, i_ref = ev.old_side("reverse", members)
    assert np.array_equal(got, i_ref[n:])
    assert np.allclose(np.where(got >= 0, d, 0), np.where(i_ref[n:] >= 0, d_ref[n:], 0), atol=1e-5)
    assert s.rescores and len(s.rescore_vectors or []) == n - moved  # moved items left the store


def test_a_rescoring_set_needs_the_rescoring_vectors() -> None:
    layout = Layout(serving="v1", rollout_id=1, from_model="v1", to_model="v2", mode="reverse")
    s = IndexSet(layout, new=VectorIndex(4), old=VectorIndex(4), rescore_vectors=ItemVectors(4), rescore_depth=2)
    with pytest.raises(ValueError, match="old_rescore"):
        s.apply(to_old=(np.arange(3), np.eye(3, 4, dtype=np.float32)))
