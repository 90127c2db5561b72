"""The merge benefit of backfilling one item: an offline reference order (the harness's `benefit` oracle).

At fraction 0 every item is in OLD and answers with its forward-path distance c(||v2(q) - h(v1_j)||^2) (c the
pack's forward calibration; the reverse path re-scores its candidates with the same distance). Moving item j
alone to NEW changes its distance to every query q to ||v2(q) - v2_j||^2 (ties: NEW first). Its *merge
benefit* is the resulting change in total AP@k over all queries, computed exactly: per query only the items
in its OLD top-k, or whose NEW distance beats its k-th OLD distance, can change its top-k.

The same from any backfill state (`in_new`): the merged list then holds NEW's distances for the items
already moved. The order net's targets (models/order.py) average it over several states, since the curve's
AUC integrates what each move is worth at the moment it is made, not only at fraction 0.

It needs labels (relevance), so it is a reference, never a plan: it ranks items by what they are worth to
the merged ranking (not by their forward error, which is what `oracle` and sigma measure), and its tail
holds items whose move lowers AP, so a curve in this order can dip at the end (not flip-safe).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from models.evaluate import K


def _ap(rel: np.ndarray) -> np.ndarray:
    """AP@k of (C, k) boolean relevance rows (the harness's definition: mean precision at relevant ranks)."""
    hits = np.cumsum(rel, axis=1)
    n_rel = rel.sum(1)
    ranks = np.arange(1, rel.shape[1] + 1)
    return np.where(n_rel > 0, (rel * hits / ranks).sum(1) / np.maximum(n_rel, 1), 0.0)


def _query_benefit(
    d_old: np.ndarray, rel_old: np.ndarray, pos: np.ndarray, d_new: np.ndarray, rel_j: np.ndarray, k: int
) -> np.ndarray:
    """One query: OLD list (k+1 calibrated distances, relevance), and per candidate its position in that list
    (k+1 = absent), NEW distance and relevance -> AP@k after the candidate alone moves, minus AP@k before."""
    idx = np.arange(k + 1)[None, :]
    src = np.where(idx < pos[:, None], idx, idx + 1)  # the OLD list without the candidate
    inside = src <= k
    d_wo = np.where(inside, d_old[np.minimum(src, k)], np.inf)
    r_wo = inside & rel_old[np.minimum(src, k)]
    at = (d_wo < d_new[:, None]).sum(1)  # ties: NEW first
    i = np.arange(k)[None, :]
    shifted = np.take_along_axis(r_wo, np.maximum(np.where(i < at[:, None], i, i - 1), 0), 1)
    r_new = np.where(i == at[:, None], rel_j[:, None], shifted)
    return _ap(r_new) - _ap(rel_old[None, :k])[0]


def _insert_table(rel_old: np.ndarray, k: int) -> np.ndarray:
    """(2, k+1): AP@k after an item from outside the list is inserted at position p (0..k) of the top-k,
    irrelevant (row 0) or relevant (row 1); position k leaves the list unchanged."""
    i = np.arange(k)[None, :]
    at = np.arange(k + 1)[:, None]
    shifted = np.take_along_axis(np.broadcast_to(rel_old[:k], (k + 1, k)), np.maximum(np.where(i < at, i, i - 1), 0), 1)
    return np.stack([_ap(np.where(i == at, rel, shifted)) for rel in (False, True)])


def merge_benefit(
    new: np.ndarray,
    h_old: np.ndarray,
    labels: np.ndarray,
    calibrate: Callable[[np.ndarray], np.ndarray],
    k: int = K,
    in_new: np.ndarray | None = None,
) -> np.ndarray:
    """Per item (gallery = queries, leave-one-out) the change in total AP@k when it alone moves to NEW, from
    the backfill state `in_new` (a boolean mask of the items already in NEW; None: none are). Items already
    in NEW have no benefit: NaN.

    Per query the merged distances are NEW's for items in NEW and the calibrated forward distance for the
    rest; items in its merged top-k+1 move within (or out of) the list, any other OLD item enters at the
    position its NEW distance earns (ties: NEW first) when that is inside the top k."""
    n = len(labels)
    lab = np.asarray(labels)
    moved = np.zeros(n, bool) if in_new is None else np.asarray(in_new, dtype=bool)
    new64, h64 = new.astype(np.float64), h_old.astype(np.float64)
    sq_new, sq_h = (new64**2).sum(1), (h64**2).sum(1)
    benefit = np.zeros(n)
    for q in range(n):
        d_new = np.maximum(sq_new + sq_new[q] - 2.0 * (new64 @ new64[q]), 0.0).astype(np.float32)
        d_h = np.maximum(sq_h + sq_new[q] - 2.0 * (h64 @ new64[q]), 0.0).astype(np.float32)
        merged = np.where(moved, d_new, calibrate(d_h)).astype(np.float32)
        d_new[q] = merged[q] = np.inf  # a query never retrieves itself
        top = np.argpartition(merged, k)[: k + 1] if n > k + 1 else np.arange(n)
        top = top[np.argsort(merged[top], kind="stable")]
        top = top[top != q][: k + 1]
        pad = k + 1 - top.size  # a gallery of k + 1 items or fewer: the list ends early (+inf, irrelevant)
        d_list = np.concatenate([merged[top], np.full(pad, np.inf, np.float32)])
        rel = np.concatenate([lab[top] == lab[q], np.zeros(pad, bool)])
        # OLD items in the list (the k+1-th may move up)
        pos = np.nonzero(~moved[top])[0]
        if pos.size:
            j = top[pos]
            benefit[j] += _query_benefit(d_list, rel, pos, d_new[j], lab[j] == lab[q], k)
        # OLD items outside it: enter at the NEW distance's rank among the top-k merged distances
        outside = ~moved
        outside[top] = False
        outside[q] = False
        enter = np.nonzero(outside & (d_new <= d_list[k - 1]))[0]
        if enter.size:
            at = np.searchsorted(d_list[:k], d_new[enter], side="left")
            benefit[enter] += _insert_table(rel, k)[(lab[enter] == lab[q]).astype(int), at] - _ap(rel[None, :k])[0]
    benefit[moved] = np.nan
    return benefit
