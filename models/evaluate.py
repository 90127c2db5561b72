"""The offline evaluation harness (docs/design.md, "Evaluation protocol"), and the definitions the service's live
measurement reuses: `merge_topk`, `ranked_metrics`, `policy_order`, `offline_point_fn`.

Protocol: gallery = queries = N images (item id = row index), leave-one-out (a query never retrieves
itself), relevant = same label, k = 100 by FAISS top-k (never an n x n matrix). mAP@k: per query the mean
of precision@i over the ranks i <= k that hold a relevant item (0 when none), averaged over queries.
Top-1: the first hit is relevant.

Backfill curve: 22 points at fractions i/21. At fraction f the first round(f * N) items in the policy's
order are in NEW (v2 vectors, searched with v2(q)); the rest are in OLD: mode `reverse` keeps v1 vectors
searched with psi(v2(q)); mode `forward` holds h(v1) vectors searched with v2(q). OLD distances pass through
the compat pack's calibration; the two top-k lists merge by distance (ties: NEW first). The `raw` baseline
searches OLD (v1 vectors) with v1(q) and merges raw distances. AUC = mean of the 22 values; relative gain =
(AUC - old/old) / (new/new - old/old); a negative flip is a point lower than its predecessor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

K = 100
N_POINTS = 22
MODES = ("reverse", "forward", "two-pass")  # merging paths (old-only = old/old; models/paths.py)
# The reverse path re-ranks OLD's top RESCORE_DEPTH * k psi candidates by ||v2(q) - h(v1)||^2 (0 = psi alone).
RESCORE_DEPTH = 3
POLICIES = ("random", "uncertainty", "oracle", "benefit")  # oracle, benefit: labelled references
INVALID = -1


def fractions(n_points: int = N_POINTS) -> np.ndarray:
    return np.arange(n_points) / (n_points - 1)


def n_in_new(fraction: float, n: int) -> int:
    """round(f * N), halves rounded up (so both ends are exact)."""
    return int(np.floor(fraction * n + 0.5))


# ------------------------------------------------------------------------------------------------ metrics


def ap_at_k(ids: np.ndarray, labels: np.ndarray, query_labels: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Per-query AP@k and top-1 from a (Q, >=k) array of ranked gallery ids (-1 = no item)."""
    ids = np.asarray(ids)[:, :k]
    valid = ids >= 0
    rel = valid & (np.asarray(labels)[np.where(valid, ids, 0)] == np.asarray(query_labels)[:, None])
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, ids.shape[1] + 1)
    n_rel = rel.sum(1)
    ap = np.where(n_rel > 0, (rel * (hits / ranks)).sum(1) / np.maximum(n_rel, 1), 0.0)
    top1 = rel[:, 0] if ids.shape[1] else np.zeros(len(ids), dtype=bool)
    return ap, top1.astype(np.float64)


def ranked_metrics(
    ranked: Sequence[Sequence[int]] | np.ndarray,
    labels: np.ndarray,
    k: int = K,
    query_labels: np.ndarray | None = None,
) -> tuple[float, float]:
    """(mAP@k, top-1) of ranked gallery-id lists (one per query; self already removed). Rows may be shorter
    than k. `query_labels` defaults to `labels` (queries = gallery, query i = item i)."""
    if isinstance(ranked, np.ndarray) and ranked.ndim == 2:
        arr = ranked[:, :k].astype(np.int64)
    else:
        arr = np.full((len(ranked), k), INVALID, dtype=np.int64)
        for r, row in enumerate(ranked):
            row = list(row)[:k]
            arr[r, : len(row)] = row
    ql = np.asarray(labels if query_labels is None else query_labels)
    if len(ql) != len(arr):
        raise ValueError(f"{len(arr)} ranked lists but {len(ql)} query labels")
    if len(arr) == 0:
        return 0.0, 0.0
    ap, top1 = ap_at_k(arr, labels, ql, k)
    return float(ap.mean()), float(top1.mean())


# ------------------------------------------------------------------------------------------ search + merge


def _threads() -> None:
    import faiss

    faiss.omp_set_num_threads(max(1, min(2, faiss.omp_get_max_threads())))


def search_subset(
    gallery: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int = K, query_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS exact top-k of `queries` over `gallery` rows (global ids `ids`), leaving each query's own id out.

    Returns (Q, k) distances (squared L2; +inf where there is no item) and global ids (-1 there)."""
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    nq = len(q)
    if len(ids) == 0 or nq == 0:
        return np.full((nq, k), np.inf, np.float32), np.full((nq, k), INVALID, np.int64)
    index = faiss.IndexFlatL2(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    kk = min(k + 1, len(ids))
    d, local = index.search(q, kk)
    gid = np.where(local >= 0, np.asarray(ids, dtype=np.int64)[np.maximum(local, 0)], INVALID)
    d = np.where(local >= 0, d, np.inf).astype(np.float32)
    if query_ids is not None:
        self_hit = gid == np.asarray(query_ids, dtype=np.int64)[:, None]
        d = np.where(self_hit, np.inf, d)
        gid = np.where(self_hit, INVALID, gid)
        order = np.argsort(d, axis=1, kind="stable")
        d, gid = np.take_along_axis(d, order, 1), np.take_along_axis(gid, order, 1)
    if kk < k:
        d = np.pad(d, ((0, 0), (0, k - kk)), constant_values=np.inf)
        gid = np.pad(gid, ((0, 0), (0, k - kk)), constant_values=INVALID)
    return d[:, :k], gid[:, :k]


def merge_topk(
    d_new: np.ndarray, i_new: np.ndarray, d_old: np.ndarray, i_old: np.ndarray, k: int = K
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge two per-query top-k lists by distance (OLD distances already calibrated). Ties go to NEW.

    Returns (distances, ids, from_new) of shape (Q, k); ids -1 (distance inf) where both lists ran out."""
    d_new = np.where(np.asarray(i_new) >= 0, d_new, np.inf)
    d_old = np.where(np.asarray(i_old) >= 0, d_old, np.inf)
    d = np.concatenate([d_new, d_old], axis=1)
    ids = np.concatenate([i_new, i_old], axis=1)
    src = np.concatenate([np.ones(np.shape(i_new), bool), np.zeros(np.shape(i_old), bool)], axis=1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    d, ids, src = (np.take_along_axis(a, order, 1) for a in (d, ids, src))
    ids = np.where(np.isfinite(d), ids, INVALID)
    return d, ids, src & (ids >= 0)


def policy_order(
    policy: str,
    n: int,
    sigma: np.ndarray | None = None,
    oracle_distance: np.ndarray | None = None,
    seed: int = 0,
    benefit: np.ndarray | None = None,
) -> np.ndarray:
    """Backfill order (item indices, first = backfilled first): random (seeded), uncertainty (descending
    score of the pack's order model), oracle (descending distance between transformed old and true new
    vector), benefit (descending exact merge benefit, models/benefit.py), fifo (index order)."""
    if policy == "random":
        return np.random.default_rng(seed).permutation(n)
    if policy == "uncertainty":
        if sigma is None:
            raise ValueError("uncertainty order needs sigma")
        return np.argsort(-np.asarray(sigma, dtype=np.float64), kind="stable")
    if policy == "oracle":
        if oracle_distance is None:
            raise ValueError("oracle order needs oracle_distance")
        return np.argsort(-np.asarray(oracle_distance, dtype=np.float64), kind="stable")
    if policy == "benefit":
        if benefit is None:
            raise ValueError("benefit order needs the merge benefit")
        return np.argsort(-np.asarray(benefit, dtype=np.float64), kind="stable")
    if policy == "fifo":
        return np.arange(n)
    raise ValueError(f"unknown policy {policy!r}")


# ---------------------------------------------------------------------------------------------- evaluator


def _identity(d: np.ndarray) -> np.ndarray:
    return d


@dataclass
class Rescore:
    """Re-scoring of an OLD space's top `depth * k` candidates in another space (the reverse path's h(v1)
    against v2(q), service/rescore.py); `calibrate` applies to the re-scored distances."""

    gallery: np.ndarray
    queries: np.ndarray
    calibrate: Callable[[np.ndarray], np.ndarray]
    depth: int


@dataclass
class Space:
    """One OLD-side configuration: gallery vectors, the query vectors searching them, a calibration, and
    optionally a re-scoring of its candidates."""

    gallery: np.ndarray
    queries: np.ndarray
    calibrate: Callable[[np.ndarray], np.ndarray] = _identity
    rescore: Rescore | None = None


def rescore_topk(
    queries: np.ndarray, gallery: np.ndarray, cand: np.ndarray, k: int, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Per query the k candidates (ids into `gallery`, -1 = none) nearest by squared L2 in `gallery`'s space:
    (Q, k) distances (inf where none) and ids, ascending."""
    q, g = np.asarray(queries, np.float32), np.asarray(gallery, np.float32)
    d_out = np.full((len(cand), k), np.inf, np.float32)
    i_out = np.full((len(cand), k), INVALID, np.int64)
    for a in range(0, len(cand), chunk):
        c = cand[a : a + chunk]
        diff = g[np.maximum(c, 0)] - q[a : a + chunk, None, :]
        d = np.where(c >= 0, np.einsum("qcd,qcd->qc", diff, diff), np.inf).astype(np.float32)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        d = np.take_along_axis(d, order, 1)
        d_out[a : a + chunk, : d.shape[1]] = d
        i_out[a : a + chunk, : d.shape[1]] = np.where(np.isfinite(d), np.take_along_axis(c, order, 1), INVALID)
    return d_out, i_out


@dataclass
class Evaluator:
    """Vectors of one model pair over one gallery (= queries); evaluates any NEW/OLD split.

    Each space is searched once over the whole gallery for the top-`cache_k` neighbours (FAISS); the top-k
    of a subset is then the first k cached neighbours inside the subset, exact whenever at least k of them
    are; the remaining queries (small subsets) are searched exactly over the subset with FAISS."""

    labels: np.ndarray
    new: np.ndarray  # v2(x), gallery and queries
    old_spaces: dict[str, Space] = field(default_factory=dict)  # "reverse" | "forward" | "raw"
    k: int = K
    cache_k: int = 4 * K

    def __post_init__(self) -> None:
        _threads()
        self.labels = np.asarray(self.labels)
        self.qids = np.arange(len(self.labels), dtype=np.int64)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        depths = [sp.rescore.depth for sp in self.old_spaces.values() if sp.rescore is not None]
        self.cache_k = max([self.cache_k] + [(d + 1) * self.k for d in depths])

    def _vectors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name == "new":
            return self.new, self.new
        sp = self.old_spaces[name]
        return sp.gallery, sp.queries

    def _full(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._cache:
            g, q = self._vectors(name)
            kk = min(max(self.cache_k, self.k), len(self.labels))
            self._cache[name] = search_subset(g, self.qids, q, kk, self.qids)
        return self._cache[name]

    def search(self, name: str, members: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact leave-one-out top-k (default `self.k`) of every query over the gallery items with `members` True."""
        members = np.asarray(members, dtype=bool)
        n, k = len(self.labels), k or self.k
        d_full, i_full = self._full(name)
        keep = (i_full >= 0) & members[np.maximum(i_full, 0)]
        count = keep.sum(1)
        full = count >= k
        d = np.full((n, k), np.inf, np.float32)
        ids = np.full((n, k), INVALID, np.int64)
        # rows with at least k survivors: their first k survivors, in order (boolean selection keeps order)
        sel = keep[full] & (np.cumsum(keep[full], axis=1) <= k)
        d[full] = d_full[full][sel].reshape(-1, k)
        ids[full] = i_full[full][sel].reshape(-1, k)
        complete = i_full.shape[1] >= n - 1  # the cached lists hold every other item
        if complete and not full.all():
            short = ~full
            order = np.argsort(~keep[short], axis=1, kind="stable")[:, :k]
            ds = np.where(
                np.take_along_axis(keep[short], order, 1), np.take_along_axis(d_full[short], order, 1), np.inf
            )
            is_ = np.where(np.isfinite(ds), np.take_along_axis(i_full[short], order, 1), INVALID)
            d[short, : ds.shape[1]], ids[short, : is_.shape[1]] = ds, is_
        redo = np.zeros(n, bool) if complete else ~full
        if redo.any():
            g, q = self._vectors(name)
            sub = np.nonzero(members)[0]
            d[redo], ids[redo] = search_subset(g[sub], sub, q[redo], k, self.qids[redo])
        return d, ids

    def single(self, name: str = "new") -> tuple[float, float]:
        """(mAP@k, top-1) of one space alone over the whole gallery ("new", or an OLD space's name)."""
        return ranked_metrics(self.search(name, np.ones(len(self.labels), bool))[1], self.labels, self.k)

    def ranked(self, in_new: np.ndarray, mode: str) -> np.ndarray:
        """(N, k) merged ranked ids for the split `in_new` (bool mask, True = backfilled)."""
        in_new = np.asarray(in_new, dtype=bool)
        if mode == "old-only":  # NEW is not searched: every item answers from its old vector
            return self.search("raw", np.ones(len(in_new), bool))[1]
        if in_new.all():
            return self.search("new", in_new)[1]
        do, i_o = self.old_side(mode, ~in_new)
        if not in_new.any():
            return i_o
        dn, i_n = self.search("new", in_new)
        return merge_topk(dn, i_n, do, i_o, self.k)[1]

    def old_side(self, mode: str, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """OLD's top-k over `members` with calibrated distances; a re-scored space re-ranks its top
        `depth * k` candidates by the re-scoring distance (calibrated by the re-scoring's calibration)."""
        sp = self.old_spaces[mode]
        if sp.rescore is None:
            d, i = self.search(mode, members)
            return np.where(i >= 0, sp.calibrate(d), np.inf), i
        r = sp.rescore
        _, cand = self.search(mode, members, r.depth * self.k)
        d, i = rescore_topk(r.queries, r.gallery, cand, self.k)
        return np.where(i >= 0, r.calibrate(d), np.inf), i

    def point(self, in_new: np.ndarray, mode: str) -> tuple[float, float]:
        return ranked_metrics(self.ranked(in_new, mode), self.labels, self.k)

    def curve(
        self, order: np.ndarray, mode: str, n_points: int = N_POINTS, progress: Any = None
    ) -> dict[str, list[float]]:
        n = len(self.labels)
        maps, top1s, fr = [], [], []
        for f in fractions(n_points):
            mask = np.zeros(n, bool)
            mask[order[: n_in_new(f, n)]] = True
            m, t = self.point(mask, mode)
            maps.append(m)
            top1s.append(t)
            fr.append(float(f))
            if progress is not None:
                progress.update(1)
        return {"fraction": fr, "map": maps, "top1": top1s}


def summarize(values: Sequence[float], old_old: float, new_new: float) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    auc = float(v.mean())
    drops = v[:-1] - v[1:]
    return {
        "auc": auc,
        "relative_gain": float((auc - old_old) / (new_new - old_old)) if new_new != old_old else float("nan"),
        "largest_negative_flip": float(max(drops.max(initial=0.0), 0.0)),
        "negative_flips": int((drops > 0).sum()),
    }


# ---------------------------------------------------------------------------------------- from artifacts


def pair_evaluator(
    old: np.ndarray,
    new: np.ndarray,
    labels: np.ndarray,
    pack: Any,
    k: int = K,
    rescore_depth: int = RESCORE_DEPTH,
    psi_only: bool = False,
) -> Evaluator:
    """An evaluator over `old` / `new` vectors of one gallery with one OLD space per query path of
    models/paths.py (reverse, forward, two-pass; old-only searches `raw`) and `raw` (old/old, the
    uncalibrated two-pass merge). The reverse space re-scores its top `rescore_depth * k` candidates with
    h(v1) (0: psi distances alone); `psi_only` adds that ablation as space `reverse-psi`."""

    def cal(mode: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda d: pack.calibrate(mode, d)

    h_old = pack.forward(old)
    psi_q = pack.reverse(new)
    rescore = Rescore(h_old, new, cal("forward"), rescore_depth) if rescore_depth > 0 else None
    spaces = {
        "reverse": Space(old, psi_q, cal("reverse"), rescore),
        "forward": Space(h_old, new, cal("forward")),
        "two-pass": Space(old, old, cal("two-pass")),
        "raw": Space(old, old),
    }
    if psi_only:
        spaces["reverse-psi"] = Space(old, psi_q, cal("reverse"))
    return Evaluator(np.asarray(labels), new, spaces, k)


def build_evaluator(
    images: np.ndarray,
    labels: np.ndarray,
    artifacts_dir: Path,
    old: str = "v1",
    new: str = "v2",
    k: int = K,
    references: bool = False,
) -> tuple[Evaluator, dict[str, np.ndarray]]:
    """Embed `images` with a pair from `artifacts_dir`; returns the evaluator and the per-item policy signals.
    `references` adds the ablation space `reverse-psi` and the labelled `benefit` signal (the harness)."""
    from models.artifacts import load_compat, load_encoder
    from models.benefit import merge_benefit

    pack = load_compat(Path(artifacts_dir) / f"compat-{old}-{new}")
    v_old = load_encoder(Path(artifacts_dir) / old).embed(images)
    v_new = load_encoder(Path(artifacts_dir) / new).embed(images)
    ev = pair_evaluator(v_old, v_new, labels, pack, k, psi_only=references)
    h_old = ev.old_spaces["forward"].gallery
    signals = {
        "sigma": pack.uncertainty(v_old),
        "oracle_reverse": ((ev.old_spaces["reverse"].queries - v_old) ** 2).sum(1),
        "oracle_forward": ((h_old - v_new) ** 2).sum(1),
    }
    if references:
        signals["benefit"] = merge_benefit(v_new, h_old, labels, lambda d: pack.calibrate("forward", d), k)
    return ev, signals


class OfflinePoint:
    """Callable `in_new mask -> (mAP@k, top-1)` for the live demo, with `old_old` / `new_new` (mAP@k)."""

    def __init__(self, evaluator: Evaluator, mode: str) -> None:
        self.evaluator = evaluator
        self.mode = mode
        self.old_old, self.old_old_top1 = evaluator.single("raw")
        self.new_new, self.new_new_top1 = evaluator.single("new")

    def __call__(self, in_new: np.ndarray) -> tuple[float, float]:
        return self.evaluator.point(np.asarray(in_new, dtype=bool), self.mode)


def offline_point_fn(
    images: np.ndarray,
    labels: np.ndarray,
    artifacts_dir: Path,
    old: str = "v1",
    new: str = "v2",
    mode: str = "reverse",
    k: int = K,
) -> OfflinePoint:
    evaluator, _ = build_evaluator(images, labels, artifacts_dir, old, new, k)
    return OfflinePoint(evaluator, mode)
