from __future__ import annotations

import numpy as np
import pytest

from models import evaluate as E
from models import harness as H


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _brute_force(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    """Independent numpy reference: full distance matrix, self excluded, AP@k as defined in docs/design.md."""
    n = len(labels)
    aps, top1 = [], []
    for q in range(n):
        d = ((gallery - queries[q]) ** 2).sum(1)
        cand = [j for j in np.argsort(d, kind="stable") if j != q][:k]
        rel = [labels[j] == labels[q] for j in cand]
        precs = [sum(rel[: i + 1]) / (i + 1) for i in range(len(rel)) if rel[i]]
        aps.append(np.mean(precs) if precs else 0.0)
        top1.append(float(rel[0]))
    return float(np.mean(aps)), float(np.mean(top1))


@pytest.fixture(scope="module")
def toy() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 6, n)
    new = _unit(rng.normal(size=(6, 16))[labels] + 0.7 * rng.normal(size=(n, 16)))
    old = _unit(rng.normal(size=(6, 8))[labels] + 1.2 * rng.normal(size=(n, 8)))
    proj = rng.normal(size=(16, 8)).astype(np.float32)
    psi_new = _unit(new @ proj)
    sigma = rng.normal(size=n).astype(np.float32)
    return {"labels": labels, "new": new, "old": old, "psi_new": psi_new, "sigma": sigma}


def _evaluator(toy: dict[str, np.ndarray], k: int, calibrate=E._identity, cache_k: int = 4 * E.K) -> E.Evaluator:
    return E.Evaluator(
        toy["labels"],
        toy["new"],
        {"reverse": E.Space(toy["old"], toy["psi_new"], calibrate), "raw": E.Space(toy["old"], toy["old"])},
        k,
        cache_k,
    )


@pytest.mark.parametrize(("k", "cache_k"), [(1, 4), (10, 40), (10, 12), (100, 400), (100, 150)])
def test_map_and_top1_equal_brute_force(toy: dict[str, np.ndarray], k: int, cache_k: int) -> None:
    ev = _evaluator(toy, k, cache_k=cache_k)
    for name, g, q in (
        ("new", toy["new"], toy["new"]),
        ("raw", toy["old"], toy["old"]),
        ("reverse", toy["old"], toy["psi_new"]),
    ):
        got = ev.single(name)
        ref = _brute_force(q, g, toy["labels"], k)
        assert got[0] == pytest.approx(ref[0], abs=1e-9)
        assert got[1] == pytest.approx(ref[1], abs=1e-9)


def test_ranked_metrics_handles_short_and_padded_lists() -> None:
    labels = np.array([0, 0, 1, 1, 0])
    # query 0: [1 (rel), 2, 4 (rel)] -> AP = (1/1 + 2/3) / 2; query 1: [] -> 0; query 2: [3] -> 1;
    # query 4: a -1 (no item) still occupies its rank: [2, -1, 0 (rel)] -> 1/3
    ranked = [[1, 2, 4], [], [3], [4, 0], [2, -1, 0]]
    m, t = E.ranked_metrics(ranked, labels, k=100)
    ap = [(1 + 2 / 3) / 2, 0.0, 1.0, 0.0, 1 / 3]
    assert m == pytest.approx(np.mean(ap))
    assert t == pytest.approx(np.mean([1, 0, 1, 0, 0]))


def _merge_reference(
    d_new: np.ndarray, i_new: np.ndarray, d_old: np.ndarray, i_old: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain-Python merge per query: valid entries of both lists sorted by distance, NEW first on a tie (list
    order otherwise), cut at k, padded with (inf, -1, False)."""
    rows_d, rows_i, rows_s = [], [], []
    for r in range(len(i_new)):
        c = [(float(d), int(i), True) for d, i in zip(d_new[r], i_new[r], strict=True) if i >= 0]
        c += [(float(d), int(i), False) for d, i in zip(d_old[r], i_old[r], strict=True) if i >= 0]
        c = sorted(c, key=lambda t: (t[0], not t[2]))[:k]
        c += [(np.inf, -1, False)] * (k - len(c))
        rows_d.append([t[0] for t in c])
        rows_i.append([t[1] for t in c])
        rows_s.append([t[2] for t in c])
    return np.array(rows_d), np.array(rows_i), np.array(rows_s)


def test_merge_topk_by_distance_ties_to_new_and_invalid_last() -> None:
    """A case worked out by hand: a tie (0.5) goes to NEW, and -1 slots come last."""
    d_new = np.array([[0.1, 0.5, np.inf]], np.float32)
    i_new = np.array([[3, 4, -1]])
    d_old = np.array([[0.2, 0.5, 0.9]], np.float32)
    i_old = np.array([[8, 7, 9]])
    d, ids, src = E.merge_topk(d_new, i_new, d_old, i_old, 4)
    assert ids.tolist() == [[3, 8, 4, 7]]
    np.testing.assert_allclose(d, [[0.1, 0.2, 0.5, 0.5]], rtol=1e-6)
    assert src.tolist() == [[True, False, True, False]]
    _, ids, src = E.merge_topk(d_new[:, :1], i_new[:, :1], d_new[:, 2:], i_new[:, 2:], 2)
    assert ids.tolist() == [[3, -1]] and src.tolist() == [[True, False]]


@pytest.mark.parametrize("seed", range(6))
def test_merge_topk_equals_reference_on_many_rows(seed: int) -> None:
    """Many query rows at once (the harness merges all queries in one call), coarse distances so ties are
    common, short lists whose -1 slots carry arbitrary distances: every row equals the reference."""
    rng = np.random.default_rng(seed)
    q, width = 9, 6

    def side(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.sort(rng.integers(0, 5, size=(q, width)) / 4, axis=1).astype(np.float32)
        i = np.stack([rng.choice(ids, size=width, replace=False) for _ in range(q)])
        for r in range(q):
            short = int(rng.integers(0, width + 1)) if rng.random() < 0.5 else 0
            if short:  # what is left in a -1 slot must not matter
                i[r, width - short :] = -1
                d[r, width - short :] = rng.choice([np.inf, 0.0, 0.3], size=short)
        return d, i

    d_new, i_new = side(np.arange(50))
    d_old, i_old = side(np.arange(50, 100))
    for k in (1, 4, width, 2 * width):  # the harness asks for at most both widths
        got = E.merge_topk(d_new, i_new, d_old, i_old, k)
        want = _merge_reference(d_new, i_new, d_old, i_old, k)
        for g, w, name in zip(got, want, ("distances", "ids", "from_new"), strict=True):
            assert g.shape == (q, k), name
            np.testing.assert_array_equal(g, w, err_msg=f"{name}, k={k}")


def test_policy_orders(toy: dict[str, np.ndarray]) -> None:
    sigma = toy["sigma"]
    order = E.policy_order("uncertainty", len(sigma), sigma=sigma)
    assert np.all(np.diff(sigma[order]) <= 0)  # descending sigma
    assert sorted(order.tolist()) == list(range(len(sigma)))
    r1, r2 = E.policy_order("random", 50, seed=1), E.policy_order("random", 50, seed=1)
    assert np.array_equal(r1, r2) and sorted(r1.tolist()) == list(range(50))
    dist = np.arange(10.0)
    assert E.policy_order("oracle", 10, oracle_distance=dist).tolist() == list(range(9, -1, -1))
    with pytest.raises(ValueError):
        E.policy_order("uncertainty", 10)


def test_curve_endpoints(toy: dict[str, np.ndarray]) -> None:
    def calibrate(d: np.ndarray) -> np.ndarray:
        return 2.0 * d + 0.1

    ev = _evaluator(toy, 100, calibrate)
    order = E.policy_order("uncertainty", len(toy["labels"]), sigma=toy["sigma"])
    c = ev.curve(order, "reverse")
    assert len(c["map"]) == 22 and c["fraction"][0] == 0.0 and c["fraction"][-1] == 1.0
    new_new = ev.single("new")
    assert c["map"][-1] == new_new[0] and c["top1"][-1] == new_new[1]
    ref0 = _brute_force(toy["psi_new"], toy["old"], toy["labels"], 100)
    assert c["map"][0] == pytest.approx(ref0[0], abs=1e-9)
    assert c["top1"][0] == pytest.approx(ref0[1], abs=1e-9)


@pytest.mark.parametrize(("n_new", "cache_k"), [(120, 400), (120, 60), (20, 60), (280, 60)])
def test_merged_point_equals_dense_computation(toy: dict[str, np.ndarray], n_new: int, cache_k: int) -> None:
    """Cached-list filtering (exact when enough survive, FAISS over the subset otherwise) = dense."""

    def calibrate(d: np.ndarray) -> np.ndarray:
        return np.interp(d, [0.0, 1.0, 4.0], [0.0, 0.8, 4.0]).astype(np.float32)

    ev = _evaluator(toy, 50, calibrate, cache_k)
    mask = np.zeros(len(toy["labels"]), bool)
    mask[E.policy_order("random", len(mask), seed=3)[:n_new]] = True
    got = ev.point(mask, "reverse")
    dense = H.dense_point(ev, mask, "reverse")
    assert got[0] == pytest.approx(dense[0], abs=1e-6)
    assert got[1] == pytest.approx(dense[1], abs=1e-6)
    ranked = ev.ranked(mask, "reverse")
    for q in range(len(mask)):
        row = ranked[q][ranked[q] >= 0]
        assert q not in row and len(set(row.tolist())) == len(row)  # never itself, never twice


def test_summarize() -> None:
    s = E.summarize([0.5, 0.6, 0.58, 0.7], old_old=0.5, new_new=0.7)
    assert s["auc"] == pytest.approx(0.595)
    assert s["relative_gain"] == pytest.approx(0.475)
    assert s["largest_negative_flip"] == pytest.approx(0.02)
    assert s["negative_flips"] == 1


def _rescored(toy: dict[str, np.ndarray], k: int, depth: int, cache_k: int) -> E.Evaluator:
    rng = np.random.default_rng(7)
    h_old = _unit(toy["old"] @ rng.normal(size=(8, 16)).astype(np.float32))

    def half(d: np.ndarray) -> np.ndarray:
        return (0.5 * d).astype(np.float32)

    space = E.Space(toy["old"], toy["psi_new"], E._identity, E.Rescore(h_old, toy["new"], half, depth))
    return E.Evaluator(toy["labels"], toy["new"], {"reverse": space}, k, cache_k)


@pytest.mark.parametrize(("n_new", "depth", "cache_k"), [(0, 3, 60), (120, 3, 60), (120, 2, 400), (280, 1, 30)])
def test_rescored_point_equals_dense_computation(
    toy: dict[str, np.ndarray], n_new: int, depth: int, cache_k: int
) -> None:
    """The re-scored reverse path (top depth*k psi candidates re-ranked by h distances) = the dense way."""
    ev = _rescored(toy, 20, depth, cache_k)
    mask = np.zeros(len(toy["labels"]), bool)
    mask[E.policy_order("random", len(mask), seed=5)[:n_new]] = True
    got = ev.point(mask, "reverse")
    dense = H.dense_point(ev, mask, "reverse")
    assert got[0] == pytest.approx(dense[0], abs=1e-6) and got[1] == pytest.approx(dense[1], abs=1e-6)


def test_rescoring_keeps_only_the_psi_candidates(toy: dict[str, np.ndarray]) -> None:
    """Brute force, one query at a time: OLD's answer is the depth*k nearest by psi, re-sorted by h distance."""
    k, depth = 10, 2
    ev = _rescored(toy, k, depth, 400)
    r = ev.old_spaces["reverse"].rescore
    assert r is not None
    members = np.ones(len(toy["labels"]), bool)
    d, ids = ev.old_side("reverse", members)
    for q in range(0, len(members), 37):
        dp = ((toy["old"] - toy["psi_new"][q]) ** 2).sum(1)
        dp[q] = np.inf
        cand = np.argsort(dp, kind="stable")[: depth * k]
        dh = ((r.gallery[cand] - r.queries[q]) ** 2).sum(1)
        expect = cand[np.argsort(dh, kind="stable")[:k]]
        assert ids[q].tolist() == expect.tolist()
        assert np.allclose(d[q], 0.5 * np.sort(dh)[:k], atol=1e-5)
