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

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

K = 100
N_POINTS = 22
MODES = ("reverse", "forward", "two-pass")  # merging paths (old-only = old/old; models/paths.py)
POLICIES = ("random", "uncertainty", "oracle")
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
) -> np.ndarray:
    """Backfill order (item indices, first = backfilled first): random (seeded), uncertainty (descending
    sigma of the old vector), oracle (descending distance between transformed old and true new vector),
    fifo (index order)."""
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
    if policy == "fifo":
        return np.arange(n)
    raise ValueError(f"unknown policy {policy!r}")


# ---------------------------------------------------------------------------------------------- evaluator


def _identity(d: np.ndarray) -> np.ndarray:
    return d


@dataclass
class Space:
    """One OLD-side configuration: gallery vectors, the query vectors searching them, a calibration."""

    gallery: np.ndarray
    queries: np.ndarray
    calibrate: Callable[[np.ndarray], np.ndarray] = _identity


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

    def search(self, name: str, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact leave-one-out top-k of every query over the gallery items with `members` True."""
        members = np.asarray(members, dtype=bool)
        n, k = len(self.labels), self.k
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
        if not in_new.any():
            return self.search(mode, ~in_new)[1]
        dn, i_n = self.search("new", in_new)
        do, i_o = self.search(mode, ~in_new)
        do = np.where(i_o >= 0, self.old_spaces[mode].calibrate(do), np.inf)
        return merge_topk(dn, i_n, do, i_o, self.k)[1]

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


def pair_evaluator(old: np.ndarray, new: np.ndarray, labels: np.ndarray, pack: Any, k: int = K) -> Evaluator:
    """An evaluator over `old` / `new` vectors of one gallery with one OLD space per query path of
    models/paths.py (reverse, forward, two-pass; old-only searches `raw`) and `raw` (old/old, the
    uncalibrated two-pass merge)."""

    def cal(mode: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda d: pack.calibrate(mode, d)

    spaces = {
        "reverse": Space(old, pack.reverse(new), cal("reverse")),
        "forward": Space(pack.forward(old), new, cal("forward")),
        "two-pass": Space(old, old, cal("two-pass")),
        "raw": Space(old, old),
    }
    return Evaluator(np.asarray(labels), new, spaces, k)


def build_evaluator(
    images: np.ndarray, labels: np.ndarray, artifacts_dir: Path, old: str = "v1", new: str = "v2", k: int = K
) -> tuple[Evaluator, dict[str, np.ndarray]]:
    """Embed `images` with a pair from `artifacts_dir`; returns the evaluator and the per-item policy signals."""
    from models.artifacts import load_compat, load_encoder

    pack = load_compat(Path(artifacts_dir) / f"compat-{old}-{new}")
    v_old = load_encoder(Path(artifacts_dir) / old).embed(images)
    v_new = load_encoder(Path(artifacts_dir) / new).embed(images)
    ev = pair_evaluator(v_old, v_new, labels, pack, k)
    signals = {
        "sigma": pack.uncertainty(v_old),
        "oracle_reverse": ((ev.old_spaces["reverse"].queries - v_old) ** 2).sum(1),
        "oracle_forward": ((ev.old_spaces["forward"].gallery - v_new) ** 2).sum(1),
    }
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


# ----------------------------------------------------------------------------------------- dense baseline


def dense_point(ev: Evaluator, in_new: np.ndarray, mode: str) -> tuple[float, float]:
    """The same point the dense way: the full N x N merged distance matrix and a full sort per query."""
    in_new = np.asarray(in_new, dtype=bool)
    sp = ev.old_spaces[mode]
    n = len(ev.labels)
    aps, top1 = np.empty(n), np.empty(n)
    step = 1000
    for a in range(0, n, step):
        b = min(a + step, n)
        qn = ev.new[a:b]
        d_new = (qn**2).sum(1)[:, None] + (ev.new**2).sum(1)[None, :] - 2 * qn @ ev.new.T
        qo = sp.queries[a:b]
        d_old = (qo**2).sum(1)[:, None] + (sp.gallery**2).sum(1)[None, :] - 2 * qo @ sp.gallery.T
        d_old = sp.calibrate(np.maximum(d_old, 0).astype(np.float32))
        d = np.where(in_new[None, :], np.maximum(d_new, 0), d_old)
        d[np.arange(b - a), np.arange(a, b)] = np.inf
        order = np.argsort(d, axis=1, kind="stable")
        ap, t1 = ap_at_k(order[:, : ev.k], ev.labels, ev.labels[a:b], ev.k)
        aps[a:b], top1[a:b] = ap, t1
    return float(aps.mean()), float(top1.mean())


# ------------------------------------------------------------------------------------------------ harness


def run_harness(
    images: np.ndarray,
    labels: np.ndarray,
    artifacts_dir: Path,
    out: Path | None = None,
    old: str = "v1",
    new: str = "v2",
    seed: int = 0,
    dense_points: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """All configurations; writes curve.json, curve.png, curve.md under `out` when given."""
    t_all = time.monotonic()
    t0 = time.monotonic()
    ev, sig = build_evaluator(images, labels, artifacts_dir, old, new)
    embed_s = time.monotonic() - t0
    old_old, old_old_t1 = ev.single("raw")
    new_new, new_new_t1 = ev.single("new")
    result: dict[str, Any] = {
        "n": len(labels),
        "k": ev.k,
        "old": old,
        "new": new,
        "fractions": [float(f) for f in fractions()],
        "old_old": {"map": old_old, "top1": old_old_t1},
        "new_new": {"map": new_new, "top1": new_new_t1},
        "curves": all_curves(ev, sig, old_old, new_new, seed, progress),
    }
    if dense_points > 0:
        result["dense_timing"] = dense_timing(ev, sig, dense_points, progress)
    result["embed_seconds"] = round(embed_s, 2)
    result["total_seconds"] = round(time.monotonic() - t_all, 2)
    if out is not None:
        write_outputs(result, Path(out))
    return result


def all_curves(
    ev: Evaluator, sig: dict[str, np.ndarray], old_old: float, new_new: float, seed: int, progress: bool
) -> list[dict[str, Any]]:
    """The raw-merge baseline and every mode x policy curve, with their summaries and timings."""
    from tqdm import tqdm

    n = len(ev.labels)
    configs: list[tuple[str, str, str]] = [("raw", "random", "baseline raw merge")]
    configs += [(mode, policy, f"{mode} / {policy}") for mode in MODES for policy in POLICIES]
    curves: list[dict[str, Any]] = []
    bar = tqdm(total=len(configs) * N_POINTS, desc="backfill curves", unit="pt", disable=not progress)
    for mode, policy, name in configs:
        oracle = sig["oracle_forward"] if mode == "forward" else sig["oracle_reverse"]
        order = policy_order(policy, n, sigma=sig["sigma"], oracle_distance=oracle, seed=seed)
        t0 = time.monotonic()
        c = ev.curve(order, mode, progress=bar)
        secs = time.monotonic() - t0
        curves.append(
            {
                "name": name,
                "mode": mode,
                "policy": policy,
                **c,
                **summarize(c["map"], old_old, new_new),
                "seconds": round(secs, 2),
            }
        )
        bar.set_postfix(last=name, secs=f"{secs:.1f}")
    bar.close()
    return curves


def dense_timing(ev: Evaluator, sig: dict[str, np.ndarray], dense_points: int, progress: bool) -> dict[str, Any]:
    """One configuration (reverse / uncertainty) both ways: FAISS top-k (a fresh evaluator, so the timing
    includes its full-gallery searches) against the dense n x n matrix + full sort per query, the latter
    timed on `dense_points` points and extrapolated to the curve's 22."""

    n = len(ev.labels)
    order = policy_order("uncertainty", n, sigma=sig["sigma"])
    fresh = Evaluator(ev.labels, ev.new, {"reverse": ev.old_spaces["reverse"]}, ev.k)
    t0 = time.monotonic()
    fc = fresh.curve(order, "reverse")
    t_faiss = time.monotonic() - t0
    per_point, max_diff, points = time_dense_points(ev, order, fc["map"], dense_points, progress)
    dense_curve = per_point * N_POINTS
    return {
        "configuration": "reverse / uncertainty",
        "faiss_seconds_per_curve": t_faiss,
        "points_timed": points,
        "dense_seconds_per_point": per_point,
        "dense_seconds_per_curve_extrapolated": dense_curve,
        "ratio_dense_over_faiss": dense_curve / max(t_faiss, 1e-9),
        "max_abs_map_difference": max_diff,
    }


def time_dense_points(
    ev: Evaluator, order: np.ndarray, reference_map: list[float], n_points: int, progress: bool = False
) -> tuple[float, float, int]:
    """Time the dense n x n approach (reverse mode) on `n_points` of the 22 points, spread evenly; returns
    (seconds per point, largest |mAP difference| against `reference_map`, points timed)."""
    from tqdm import tqdm

    n = len(ev.labels)
    picks = np.linspace(0, N_POINTS - 1, n_points).round().astype(int)
    fr = fractions()
    t_dense, diffs = 0.0, []
    for p in tqdm(picks, desc="dense timing", unit="pt", disable=not progress):
        mask = np.zeros(n, bool)
        mask[order[: n_in_new(fr[p], n)]] = True
        t0 = time.perf_counter()
        dm, _ = dense_point(ev, mask, "reverse")
        t_dense += time.perf_counter() - t0
        diffs.append(abs(dm - reference_map[p]))
    return t_dense / len(picks), float(max(diffs)), len(picks)


def table(result: dict[str, Any]) -> str:
    oo, nn_ = result["old_old"], result["new_new"]
    lines = [
        f"Backfill curves: {result['old']} -> {result['new']}, N = {result['n']} (gallery = queries, "
        f"leave-one-out), mAP@{result['k']}; 22 points at fractions i/21.",
        "",
        "| configuration | AUC (mAP@100) | relative gain | largest negative flip | flips | "
        "mAP at 0 | mAP at 1/21 | top-1 AUC | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| old/old | {oo['map']:.4f} | 0 | - | - | - | - | {oo['top1']:.4f} | - |",
        f"| new/new | {nn_['map']:.4f} | 1 | - | - | - | - | {nn_['top1']:.4f} | - |",
    ]
    for c in result["curves"]:
        lines.append(
            f"| {c['name']} | {c['auc']:.4f} | {c['relative_gain']:.3f} | {c['largest_negative_flip']:.4f} | "
            f"{c['negative_flips']} | {c['map'][0]:.4f} | {c['map'][1]:.4f} | {float(np.mean(c['top1'])):.4f} | "
            f"{c['seconds']:.1f} |"
        )
    dt = result.get("dense_timing")
    if dt:
        lines += [
            "",
            f"Dense baseline (full {result['n']}x{result['n']} distance matrix + full sort per query), "
            f"{dt['configuration']}: {dt['dense_seconds_per_point']:.2f} s/point on {dt['points_timed']} points, "
            f"so {dt['dense_seconds_per_curve_extrapolated']:.0f} s for the 22-point curve, against "
            f"{dt['faiss_seconds_per_curve']:.1f} s with FAISS top-k (ratio {dt['ratio_dense_over_faiss']:.1f}x); "
            f"max |mAP difference| on the timed points {dt['max_abs_map_difference']:.2e}.",
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"raw": ":", "reverse": "-", "forward": "--", "two-pass": "-."}
    colors = {"random": "tab:blue", "uncertainty": "tab:green", "oracle": "tab:purple"}
    for c in result["curves"]:
        color = "tab:red" if c["mode"] == "raw" else colors[c["policy"]]
        ax.plot(
            c["fraction"],
            c["map"],
            styles[c["mode"]],
            color=color,
            marker=".",
            label=f"{c['name']} (gain {c['relative_gain']:.2f})",
        )
    ax.axhline(result["old_old"]["map"], color="gray", ls="-.", lw=1, label="old/old")
    ax.axhline(result["new_new"]["map"], color="black", ls="-.", lw=1, label="new/new")
    ax.set_xlabel("backfilled fraction")
    ax.set_ylabel(f"mAP@{result['k']}")
    ax.set_title(f"Backfill {result['old']} -> {result['new']} (N = {result['n']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(result, indent=2))
    (out / "curve.md").write_text(table(result))
    plot(result, out / "curve.png")
