"""Distance-rank merge of the NEW and OLD top-k lists (Seo et al., arXiv 2301.03767).

OLD distances must already be on NEW's scale (`CompatPack.calibrate(mode, d)`); then the merged top-k is
the exact top-k over the union of both sides. Ties go to NEW (the better model) and an id never appears
twice, even if a caller hands over overlapping lists.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

NEW = "new"
OLD = "old"


class Hit(NamedTuple):
    item_id: int
    distance: float
    source: str  # "new" | "old"


_SOURCES = (NEW, OLD)


def merge_topk(
    new_d: np.ndarray,
    new_i: np.ndarray,
    old_d: np.ndarray | None,
    old_i: np.ndarray | None,
    k: int,
) -> list[list[Hit]]:
    """(M, kn) NEW and (M, ko) calibrated OLD distances/ids (-1 = empty slot) -> per query the k nearest
    hits of the union, ascending distance, one hit per id."""
    new_d = np.asarray(new_d, dtype=np.float32)
    new_i = np.asarray(new_i, dtype=np.int64)
    if new_d.shape[0] <= 2:  # one or two queries: list work costs less than array work (3x for one side)
        if old_d is None or old_i is None:
            return [_merge_sorted(nd, ni, [], [], k) for nd, ni in zip(new_d.tolist(), new_i.tolist(), strict=True)]
        return [
            _merge_sorted(nd, ni, od, oi, k)
            for nd, ni, od, oi in zip(
                new_d.tolist(),
                new_i.tolist(),
                np.asarray(old_d, dtype=np.float32).tolist(),
                np.asarray(old_i).tolist(),
                strict=True,
            )
        ]
    if old_d is None or old_i is None or np.asarray(old_i).size == 0:
        dist, ids, src = new_d, new_i, np.zeros(new_i.shape, dtype=np.int8)
        order = None  # each side's list is sorted already
    else:
        old_i = np.asarray(old_i, dtype=np.int64)
        dist = np.concatenate([new_d, np.asarray(old_d, dtype=np.float32)], axis=1)
        ids = np.concatenate([new_i, old_i], axis=1)
        # 0 = new, 1 = old: with a stable sort on distance, NEW wins ties because it comes first.
        src = np.concatenate([np.zeros(new_i.shape, np.int8), np.ones(old_i.shape, np.int8)], axis=1)
        dist = np.where(ids < 0, np.inf, dist)
        order = np.argsort(dist, axis=1, kind="stable")
        dist = np.take_along_axis(dist, order, 1)
        ids = np.take_along_axis(ids, order, 1)
        src = np.take_along_axis(src, order, 1)
    top = ids[:, :k]
    # Fast path: no id twice within a row's top k (the sides are disjoint by construction).
    srt = np.sort(top, axis=1)
    if not ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any():
        return [
            [Hit(int(i), float(d), _SOURCES[int(s)]) for i, d, s in zip(ir, dr, sr, strict=True) if i >= 0]
            for ir, dr, sr in zip(top.tolist(), dist[:, :k].tolist(), src[:, :k].tolist(), strict=True)
        ]
    out: list[list[Hit]] = []
    all_ids: list[list[int]] = ids.tolist()
    all_d: list[list[float]] = dist.tolist()
    all_s: list[list[int]] = src.tolist()  # type: ignore[assignment]
    rows = zip(all_ids, all_d, all_s, strict=True)
    for ir, dr, sr in rows:
        hits: list[Hit] = []
        seen: set[int] = set()
        for i, d, s in zip(ir, dr, sr, strict=True):
            if i < 0 or i in seen:
                continue
            seen.add(i)
            hits.append(Hit(i, d, _SOURCES[s]))
            if len(hits) == k:
                break
        out.append(hits)
    return out


def _merge_sorted(nd: list[float], ni: list[int], od: list[float], oi: list[int], k: int) -> list[Hit]:
    """Two-pointer merge of two ascending lists: cheaper than array work for one or two queries."""
    hits: list[Hit] = []
    seen: set[int] = set()
    a = b = 0
    while len(hits) < k and (a < len(ni) or b < len(oi)):
        take_new = b >= len(oi) or (a < len(ni) and (oi[b] < 0 or (ni[a] >= 0 and nd[a] <= od[b])))
        if take_new:
            i, d, src = ni[a], nd[a], NEW
            a += 1
        else:
            i, d, src = oi[b], od[b], OLD
            b += 1
        if i < 0 or i in seen:
            continue
        seen.add(i)
        hits.append(Hit(i, d, src))
    return hits
