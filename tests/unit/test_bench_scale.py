"""Section 9 (`devtools/bench/scale.py`) on small sizes, against independent computations: the streamed exact
merged top-k equals a float64 brute force over every item, the recall and the byte counts are computed right,
the IVF-Flat built from released memory equals one built by `add`, and the section runs end to end."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from devtools.bench import BenchConfig, markdown, run_bench
from devtools.bench.common import recall_at
from devtools.bench.scale import (
    FRACTIONS,
    Synth,
    build_ivf_flat,
    build_pq,
    exact_pass,
    fill_sides,
    flat_bytes,
    flat_search,
    ivf_bytes,
    ivf_search,
    measure,
    moved,
    train_spaces,
)

K = 10


def _all(syn: Synth) -> tuple[np.ndarray, np.ndarray]:
    x1 = np.concatenate([syn.v1(c)[1] for c in range(syn.chunks)])
    return x1, syn.v2(x1.copy())


def _sq(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    return (q64**2).sum(1)[:, None] + (x64**2).sum(1)[None, :] - 2 * q64 @ x64.T


def _brute_merged(syn: Synth, qn: np.ndarray, qo: np.ndarray, f: float) -> np.ndarray:
    """Union of both sides (NEW: v2 vectors with v2(q); OLD: v1 vectors with psi(v2(q))), top-k by distance."""
    x1, x2 = _all(syn)
    mv = moved(np.arange(syn.n), f)
    dist = np.where(mv[None, :], _sq(qn, x2), _sq(qo, x1))
    return np.argsort(dist, axis=1, kind="stable")[:, :K]


def test_generator_is_deterministic_and_split_evenly() -> None:
    a, b = Synth(10_000, chunk=4096), Synth(10_000, chunk=4096)
    assert np.array_equal(a.v1(1)[1], b.v1(1)[1]) and np.array_equal(a.v1(2)[0], np.arange(8192, 10_000))
    _, x = a.v1(0)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(a.v2(x.copy()), axis=1), 1, atol=1e-5)
    ids = np.arange(100_000)
    for f in FRACTIONS:
        assert abs(moved(ids, f).mean() - f) < 0.001
    assert np.all(moved(ids, 0.3) <= moved(ids, 0.6))  # a growing backfill only adds items to NEW


@pytest.mark.parametrize("n", [20_000])
def test_exact_merged_equals_brute_force(n: int) -> None:
    syn = Synth(n, chunk=4096)
    qn, qo = syn.queries(20)
    truth = exact_pass(syn, qn, qo, K, None)
    for f in FRACTIONS:
        want = _brute_merged(syn, qn, qo, f)
        got = truth.merged[f]
        assert [set(r) for r in got.tolist()] == [set(r) for r in want.tolist()], f


def test_recall_at_counts_shared_ids() -> None:
    rng = np.random.default_rng(0)
    truth = np.stack([rng.permutation(50)[:K] for _ in range(30)])
    got = truth.copy()
    got[:, 7:] = 1000 + np.arange(3)  # 3 of 10 wrong in every row
    got[0, 0] = -1  # and one empty slot in row 0
    expected = np.mean(
        [sum(1 for x in g if x in set(t)) / K for g, t in zip(got.tolist(), truth.tolist(), strict=True)]
    )
    assert recall_at(got, truth, K) == pytest.approx(expected)
    assert recall_at([r[r >= 0].tolist() for r in got], truth, K) == pytest.approx(expected)  # short id lists
    assert recall_at(truth, truth, K) == 1.0


@pytest.fixture(scope="module")
def small() -> tuple[Synth, dict, np.ndarray, np.ndarray, object]:
    syn = Synth(6_000, chunk=2048)
    spaces = train_spaces(syn)
    qn, qo = syn.queries(15)
    truth = exact_pass(syn, qn, qo, K, spaces)
    return syn, spaces, qn, qo, truth


def test_assignments_are_nearest_centroids(small: tuple) -> None:
    syn, spaces, *_ = small
    x1, x2 = _all(syn)
    for s, x in (("old", x1), ("new", x2)):
        want = np.argmin(_sq(x, spaces[s].centroids), axis=1)
        assert np.mean(spaces[s].assign == want) > 0.999


def test_indices_recall_and_bytes(small: tuple) -> None:
    syn, spaces, qn, qo, truth = small
    qs = {"new": qn, "old": qo}
    f = 0.5
    sides = fill_sides(syn, f, spaces)
    assert sides["new"].n + sides["old"].n == syn.n
    flat = measure({s: flat_search(sd, K) for s, sd in sides.items()}, qs, truth.merged[f], K)
    assert flat["recall"] == 1.0
    ref = faiss.IndexIDMap(faiss.IndexFlatL2(syn.d))
    ref.add_with_ids(sides["old"].x, sides["old"].ids)
    assert flat_bytes(sides["old"].n, syn.d) == pytest.approx(faiss.serialize_index(ref).size, rel=0.001)
    nlist = len(spaces["old"].centroids)
    pq = {s: build_pq(sd, spaces[s]) for s, sd in sides.items()}
    assert ivf_bytes(pq["old"]) == pytest.approx(faiss.serialize_index(pq["old"]).size, rel=0.01)
    every = measure({s: ivf_search(sides[s], ix, nlist, K, 200) for s, ix in pq.items()}, qs, truth.merged[f], K)
    assert every["recall"] == 1.0  # every list probed and every item re-ranked exactly: exact
    plain = measure({s: ivf_search(sides[s], ix, 8, K) for s, ix in pq.items()}, qs, truth.merged[f], K)
    # recall recomputed another way (membership of each exact id), and PQ without re-ranking is lossy here
    found = [np.isin(t[t >= 0], g[g >= 0]).sum() / K for g, t in zip(plain["ids"], truth.merged[f], strict=True)]
    assert plain["recall"] == pytest.approx(float(np.mean(found)))
    assert plain["recall"] < every["recall"]
    # IVF-Flat from released memory equals an IVF-Flat filled by `add_with_ids` from the same centroids
    old = sides["old"]
    x, ids, assign = old.x.copy(), old.ids.copy(), old.assign.copy()
    ivf = build_ivf_flat(old, spaces["old"])
    assert not old.x[: old.n - 2048].any()  # the copied rows' pages went back to the system (zeros)
    q = faiss.IndexFlatL2(syn.d)
    q.add(spaces["old"].centroids)
    plain_ivf = faiss.IndexIVFFlat(q, syn.d, nlist)
    pos = np.arange(len(x), dtype=np.int64)
    plain_ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(pos), faiss.swig_ptr(assign))
    sizes = [ivf.invlists.list_size(lst) for lst in range(nlist)]
    assert sizes == [plain_ivf.invlists.list_size(lst) for lst in range(nlist)]
    assert sizes == np.bincount(assign, minlength=nlist).tolist()
    ivf.nprobe = plain_ivf.nprobe = 4
    d1, i1 = ivf.search(qo, K)
    d2, i2 = plain_ivf.search(qo, K)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    assert ivf_bytes(ivf) == pytest.approx(faiss.serialize_index(ivf).size, rel=0.01)
    assert ids.size == old.n and set(ids.tolist()) <= set(range(syn.n))
    for sd in sides.values():
        sd.close()


def test_section_runs_end_to_end(tmp_path: Path) -> None:
    cfg = BenchConfig(quick=True, only=(9,), out_dir=tmp_path / "bench", scale_n=5_000, milvus_n=1_000)
    res = run_bench(cfg, "test")
    sec = res["sections"]["9"]
    assert "error" not in sec, sec
    rows = sec["faiss"]["rows"]
    assert len(rows) == 3 * 7 and {r["fraction"] for r in rows} == set(FRACTIONS)
    assert all(r["recall"] == 1.0 for r in rows if r["index"] == "Flat")
    assert all(0 <= r["recall"] <= 1 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    mil = sec["milvus"]
    assert "error" not in mil, mil
    assert [r["fraction"] for r in mil["rows"]] == list(FRACTIONS)
    assert all(r["recall"] >= 0.99 for r in mil["rows"])  # FLAT is exact (float ties aside)
    md = markdown(res)
    assert "## Merged OLD + NEW search at 5,000 items" in md and "milvus-lite at 1,000 items" in md
