"""Distance-rank merge against brute force over the union of both sides."""

from __future__ import annotations

import numpy as np
import pytest

from service.merge import merge_topk


def _brute(new_d, new_i, old_d, old_i, k):
    out = []
    for r in range(new_d.shape[0]):
        cands = [(float(d), int(i), "new") for d, i in zip(new_d[r], new_i[r], strict=True) if i >= 0]
        cands += [(float(d), int(i), "old") for d, i in zip(old_d[r], old_i[r], strict=True) if i >= 0]
        cands.sort(key=lambda t: (t[0], t[2] != "new"))
        out.append(cands[:k])
    return out


@pytest.mark.parametrize("m", [1, 2, 7])  # 1-2 queries: two-pointer path; more: array path
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
    for r in range(m):
        assert [h.item_id for h in merged[r]] == exact[r].tolist()
        assert all((h.source == "new") == (h.item_id < 1000) for h in merged[r])
        ds = [h.distance for h in merged[r]]
        assert ds == sorted(ds)


def test_padding_duplicates_and_short_lists() -> None:
    new_d = np.array([[0.1, 0.5, np.inf]], np.float32)
    new_i = np.array([[1, 2, -1]])
    old_d = np.array([[0.2, 0.4, 0.05]], np.float32)
    old_i = np.array([[3, 2, -1]])  # id 2 on both sides must appear once; -1 slots are ignored
    got = merge_topk(new_d, new_i, old_d, old_i, 10)[0]
    assert [(h.item_id, h.source) for h in got] == [(1, "new"), (3, "old"), (2, "old")]
    assert merge_topk(new_d, new_i, None, None, 1)[0][0].item_id == 1


def test_ties_prefer_new() -> None:
    got = merge_topk(np.array([[0.3]]), np.array([[1]]), np.array([[0.3]]), np.array([[2]]), 1)[0]
    assert [(h.item_id, h.source) for h in got] == [(1, "new")]


def test_brute_helper_agrees_on_random_lists() -> None:
    rng = np.random.default_rng(9)
    nd, od = np.sort(rng.random((3, 6)), 1), np.sort(rng.random((3, 6)), 1)
    ni, oi = rng.permutation(100)[:18].reshape(3, 6), rng.permutation(np.arange(100, 200))[:18].reshape(3, 6)
    got = merge_topk(nd, ni, od, oi, 5)
    want = _brute(nd, ni, od, oi, 5)
    for g, w in zip(got, want, strict=True):
        assert [(h.item_id, h.source) for h in g] == [(i, s) for _, i, s in w]
