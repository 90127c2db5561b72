"""Distance-rank merge against brute force over the union of both sides.

`merge_topk` has two implementations: a two-pointer merge for one or two queries and an array path for more
(with a fast path when no id repeats). Every property below (exact top-k, ties to NEW, one hit per id,
padding ignored) is checked on BOTH, with more than one query row in the array path, against `_brute`: a
plain-Python reference that shares no code with the module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.merge import Hit, merge_topk

# Query counts that reach each implementation: 1-2 the two-pointer merge, 3+ the array path.
TWO_POINTER, ARRAY = (1, 2), (3, 7)


def _brute(
    new_d: np.ndarray, new_i: np.ndarray, old_d: np.ndarray | None, old_i: np.ndarray | None, k: int
) -> list[list[tuple[int, float, str]]]:
    """Per query: every (distance, id, side) of both lists, -1 slots dropped, sorted by distance with NEW
    before OLD on a tie (and each list's own order otherwise), the first hit of each id kept, k of them."""
    out = []
    for r in range(len(new_i)):
        cands = [(float(d), int(i), "new") for d, i in zip(new_d[r], new_i[r], strict=True) if i >= 0]
        if old_d is not None and old_i is not None:
            cands += [(float(d), int(i), "old") for d, i in zip(old_d[r], old_i[r], strict=True) if i >= 0]
        cands.sort(key=lambda t: (t[0], t[2] != "new"))  # stable: list order among equal keys
        row: list[tuple[int, float, str]] = []
        seen: set[int] = set()
        for d, i, side in cands:
            if i not in seen and len(row) < k:
                seen.add(i)
                row.append((i, d, side))
        out.append(row)
    return out


def _as_tuples(merged: list[list[Hit]]) -> list[list[tuple[int, float, str]]]:
    return [[(h.item_id, h.distance, h.source) for h in row] for row in merged]


def _side_lists(
    rng: np.random.Generator, m: int, width: int, ids: np.ndarray, levels: int
) -> tuple[np.ndarray, np.ndarray]:
    """(m, width) ascending distances and ids as a FAISS index returns them: distinct ids within a row,
    distances from `levels` values (so ties are common), and a random number of -1 / inf slots at the end."""
    d = np.sort(rng.integers(0, levels, size=(m, width)) / levels, axis=1).astype(np.float32)
    i = np.stack([rng.choice(ids, size=width, replace=False) for _ in range(m)])
    for r in range(m):
        short = int(rng.integers(0, width + 1)) if rng.random() < 0.4 else 0
        if short:
            d[r, width - short :], i[r, width - short :] = np.inf, -1
    return d, i


@pytest.mark.parametrize("m", [*TWO_POINTER, *ARRAY])
@pytest.mark.parametrize("seed", range(4))
def test_merged_topk_equals_exact_topk_of_union(seed: int, m: int) -> None:
    rng = np.random.default_rng(seed)
    n_new, n_old, k = 50, 70, 10
    new_vecs, old_vecs = rng.normal(size=(n_new, 4)), rng.normal(size=(n_old, 4))
    q = rng.normal(size=(m, 4))
    # Disjoint ids, as the two sides always are; exact distances for every item of each side.
    new_ids, old_ids = np.arange(n_new), np.arange(1000, 1000 + n_old)
    dn = ((q[:, None] - new_vecs[None]) ** 2).sum(-1)
    do = ((q[:, None] - old_vecs[None]) ** 2).sum(-1) * 0.7  # "calibrated" scale differs from raw
    # Each side contributes its own top-k (what FAISS returns).
    on, oo = np.argsort(dn, axis=1)[:, :k], np.argsort(do, axis=1)[:, :k]
    merged = merge_topk(np.take_along_axis(dn, on, 1), new_ids[on], np.take_along_axis(do, oo, 1), old_ids[oo], k)
    # Exact top-k over the union of BOTH WHOLE sides.
    union_d = np.concatenate([dn, do], axis=1)
    union_i = np.concatenate([np.broadcast_to(new_ids, dn.shape), np.broadcast_to(old_ids, do.shape)], axis=1)
    exact = np.take_along_axis(union_i, np.argsort(union_d, axis=1)[:, :k], 1)
    assert len(merged) == m
    for r in range(m):
        assert [h.item_id for h in merged[r]] == exact[r].tolist()
        assert all((h.source == "new") == (h.item_id < 1000) for h in merged[r])
        ds = [h.distance for h in merged[r]]
        assert ds == sorted(ds)
        exact_d = np.sort(union_d[r])[:k].astype(np.float32)
        np.testing.assert_allclose(ds, exact_d, rtol=1e-6)


@pytest.mark.parametrize("m", [*TWO_POINTER, *ARRAY])
@pytest.mark.parametrize("overlap", [False, True], ids=["disjoint", "overlapping"])
@pytest.mark.parametrize("seed", range(6))
def test_ties_duplicates_and_padding_equal_brute_force(seed: int, m: int, overlap: bool) -> None:
    """Coarse distances (many ties within and across sides), short lists, and (when `overlap`) ids that
    both sides return: every row of every path equals the reference, for k below, at and above the width."""
    rng = np.random.default_rng(100 * seed + m)
    width = 8
    new_ids = np.arange(20)
    old_ids = np.arange(10, 30) if overlap else np.arange(100, 120)
    nd, ni = _side_lists(rng, m, width, new_ids, levels=4)
    od, oi = _side_lists(rng, m, width, old_ids, levels=4)
    for k in (1, 3, width, 2 * width + 1):
        got = _as_tuples(merge_topk(nd, ni, od, oi, k))
        assert got == _brute(nd, ni, od, oi, k), (k, nd, ni, od, oi)
        for row in got:
            assert len({i for i, _, _ in row}) == len(row)  # never an id twice
            assert all(not math.isinf(d) for _, d, _ in row)  # never a padding slot


@pytest.mark.parametrize("m", [*TWO_POINTER, *ARRAY])
def test_ties_prefer_new(m: int) -> None:
    """Equal distances on both sides: NEW's hit comes first, in every row."""
    nd = np.tile(np.array([[0.3, 0.5]], np.float32), (m, 1))
    od = nd.copy()
    ni = np.array([[1 + 10 * r, 2 + 10 * r] for r in range(m)])
    oi = ni + 5
    got = merge_topk(nd, ni, od, oi, 3)
    assert [[(h.item_id, h.source) for h in row] for row in got] == [
        [(1 + 10 * r, "new"), (6 + 10 * r, "old"), (2 + 10 * r, "new")] for r in range(m)
    ]


# One row per case; id 7 is on both sides. (new list, old list, the merged row worked out by hand.)
BOTH_SIDES = [
    ([(0.5, 1), (0.75, 7)], [(0.25, 7), (0.625, 3)], [(7, 0.25, "old"), (1, 0.5, "new"), (3, 0.625, "old")]),
    ([(0.25, 7), (0.5, 1)], [(0.625, 3), (0.75, 7)], [(7, 0.25, "new"), (1, 0.5, "new"), (3, 0.625, "old")]),
    ([(0.375, 7), (0.5, 1)], [(0.375, 7), (0.625, 3)], [(7, 0.375, "new"), (1, 0.5, "new"), (3, 0.625, "old")]),
]


@pytest.mark.parametrize("m", [*TWO_POINTER, *ARRAY])
def test_an_id_on_both_sides_appears_once_at_its_nearer_distance(m: int) -> None:
    """Overlapping lists (which the merge must tolerate): the id is kept once, from the side where it is
    nearer, NEW on a tie; rows cycle through the cases so the array path sees them side by side."""
    cases = [BOTH_SIDES[r % len(BOTH_SIDES)] for r in range(m)]
    nd = np.array([[d for d, _ in new] for new, _, _ in cases], np.float32)
    ni = np.array([[i for _, i in new] for new, _, _ in cases])
    od = np.array([[d for d, _ in old] for _, old, _ in cases], np.float32)
    oi = np.array([[i for _, i in old] for _, old, _ in cases])
    got = _as_tuples(merge_topk(nd, ni, od, oi, 10))
    assert got == [want for _, _, want in cases]
    assert got == _brute(nd, ni, od, oi, 10)


@pytest.mark.parametrize("m", [*TWO_POINTER, *ARRAY])
def test_without_old_side_the_new_list_is_returned_as_is(m: int) -> None:
    rng = np.random.default_rng(m)
    nd, ni = _side_lists(rng, m, 6, np.arange(50), levels=10)
    want = _brute(nd, ni, None, None, 4)
    assert _as_tuples(merge_topk(nd, ni, None, None, 4)) == want
    empty = np.empty((m, 0))
    assert _as_tuples(merge_topk(nd, ni, empty, empty.astype(np.int64), 4)) == want


def test_brute_reference_on_a_hand_worked_case() -> None:
    """The reference itself, on a case worked out by hand (id 2 on both sides, a tie, padding)."""
    nd, ni = np.array([[0.1, 0.4, np.inf]]), np.array([[1, 2, -1]])
    od, oi = np.array([[0.2, 0.4, np.inf]]), np.array([[3, 2, -1]])
    assert _brute(nd, ni, od, oi, 10) == [[(1, 0.1, "new"), (3, 0.2, "old"), (2, 0.4, "new")]]
