"""Compressed indices (IVF-PQ) and IVF-PQ with exact re-ranking (",RFlat") in `VectorIndex`: add, replace,
remove and search against brute force, with recall bounded by a FAISS reference index of the same type fed
the same vectors (never a typed number); and the start-up check that refuses what cannot work."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from service.config import Settings, SettingsError, check_startup
from service.index import VectorIndex

D, K, NPROBE, K_FACTOR = 16, 10, 2, 4
BASE = "IVF4,PQ4x4"  # 4 lists, 2 bytes of code; the codebooks (16 centroids each) need 624 points to train


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(32, D)).astype(np.float32)
    vecs = (centers[rng.integers(0, 32, 1_200)] + 0.3 * rng.normal(size=(1_200, D))).astype(np.float32)
    fresh = (centers[rng.integers(0, 32, 40)] + 0.3 * rng.normal(size=(40, D))).astype(np.float32)
    queries = (centers[rng.integers(0, 32, 100)] + 0.3 * rng.normal(size=(100, D))).astype(np.float32)
    return vecs, fresh, queries, rng.permutation(1_200)


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / K for g, t in zip(got.tolist(), truth.tolist(), strict=True)]))


def _exact(ids: np.ndarray, vecs: np.ndarray, q: np.ndarray) -> np.ndarray:
    d = ((q[:, None] - vecs[None]) ** 2).sum(-1)
    return ids[np.argsort(d, axis=1)[:, :K]]


def _run(factory: str) -> tuple[VectorIndex, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two adds (the first too small to train the codebooks), 60 removals, 40 replacements."""
    vecs, fresh, _, perm = _data()
    vi = VectorIndex(D, factory, search_params=f"nprobe={NPROBE},k_factor={K_FACTOR}")
    vi.add(np.arange(500), vecs[:500])
    assert vi.staged  # 500 < 16 codebook centroids x 39 points (though > 4 lists x 39): still exact
    vi.add(np.arange(500, 1_200), vecs[500:])
    assert not vi.staged and len(vi) == 1_200
    removed, replaced = perm[:60], perm[60:100]
    assert vi.remove(removed) == 60
    vi.add(replaced, fresh)
    live = np.setdiff1d(np.arange(1_200), removed)
    final = vecs.copy()
    final[replaced] = fresh
    return vi, vecs, final, live, removed, replaced


def test_ivf_pq_matches_a_faiss_ivf_pq_fed_the_same_operations() -> None:
    vi, vecs, final, live, removed, replaced = _run(BASE)
    _, _, queries, _ = _data()
    ref = faiss.index_factory(D, BASE)
    ref.do_polysemous_training = False  # as the service builds it (a permutation of the codebooks only)
    ref.train(vecs)  # the service trains on every vector held when it crosses the threshold, in order
    ref.add_with_ids(vecs, np.arange(1_200, dtype=np.int64))
    ref.remove_ids(np.concatenate([removed, replaced]).astype(np.int64))
    ref.add_with_ids(final[replaced], replaced.astype(np.int64))
    ref.nprobe = NPROBE
    truth = _exact(live, final[live], queries)
    d, got = vi.search(queries, K)
    _, want = ref.search(queries, K)
    assert not np.isin(got, removed).any()
    assert _recall(got, truth) >= _recall(want, truth)
    assert np.all(np.diff(d, axis=1) >= 0)
    # replaced items are found under their new vectors as often as the reference finds them
    _, own = vi.search(final[replaced], K)
    _, ref_own = ref.search(final[replaced], K)
    found = sum(int(r) in row for r, row in zip(replaced, own.tolist(), strict=True))
    assert found >= sum(int(r) in row for r, row in zip(replaced, ref_own.tolist(), strict=True)) > 0


def test_refined_ivf_pq_reranks_exactly_and_beats_plain_pq() -> None:
    vi, vecs, final, live, removed, replaced = _run(BASE + ",RFlat")
    _, _, queries, _ = _data()
    base = faiss.index_factory(D, BASE)
    base.do_polysemous_training = False
    base.train(vecs)
    base.nprobe = NPROBE
    ref = faiss.IndexRefineFlat(base)  # FAISS's own refine: positions, no ids, no removal -> the live set
    ref.k_factor = K_FACTOR
    ref.add(final[live])
    truth = _exact(live, final[live], queries)
    d, got = vi.search(queries, K)
    _, pos = ref.search(queries, K)
    want = np.where(pos >= 0, live[np.clip(pos, 0, None)], -1)
    assert not np.isin(got, removed).any()
    assert _recall(got, truth) >= _recall(want, truth)
    # the distances are exact squared L2 to the stored (replaced where replaced) vectors
    exact_d = ((final[got] - queries[:, None]) ** 2).sum(-1)
    assert np.allclose(d, exact_d, rtol=1e-4, atol=1e-4)
    plain, *_ = _run(BASE)
    assert _recall(got, truth) > _recall(plain.search(queries, K)[1], truth)
    # a replaced item is re-ranked by its new vector: where found under it, at distance 0
    od, own = vi.search(final[replaced], K)
    hit = own == replaced[:, None]
    assert hit.any() and np.allclose(od[hit], 0.0, atol=1e-4)
    assert vi.memory_bytes() > plain.memory_bytes() + len(live) * D * 4  # the exact vectors are held


@pytest.mark.parametrize("factory", ["IVF64,PQ16", "IVF64,PQ16,RFlat", "IVF64,PQ8x4fs,RFlat"])
def test_startup_accepts_compressed_factories(tmp_path: Path, factory: str) -> None:
    check_startup(Settings(artifacts_dir=tmp_path, index_factory=factory, index_search_params="nprobe=8,k_factor=4"))


@pytest.mark.parametrize(
    ("factory", "says"),
    [
        ("IVF64,PQ16,Refine(Flat)", "IndexRefine has no ids or removal"),
        ("HNSW32,RFlat", "IndexRefine has no ids or removal"),
        ("PQ16", "needs training"),
    ],
)
def test_startup_refuses_what_cannot_serve(tmp_path: Path, factory: str, says: str) -> None:
    with pytest.raises(SettingsError, match=says) as e:
        check_startup(Settings(artifacts_dir=tmp_path, index_factory=factory))
    assert "\n" not in str(e.value)
