"""Section 1: merged OLD+NEW search vs one index over all items.

Real gallery (Fashion-MNIST test embedded with the shipped v1/v2, OLD queried with psi(v2(q)) and
calibrated) and synthetic d=64 vectors: Flat on random unit vectors, IVF on clustered ones at nprobe 1, 8
and 32, each row with the recall@k of the one index and of the merge against their exact answers (brute
force over the same items, the merge's with the same calibration). Target: latency ratio <= 1.10 at equal
recall.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from devtools.bench.common import Artifacts, clustered, fashion_test, ms, recall_at, time_pair, unit, unit_centers
from devtools.bench.config import BenchConfig
from service.index import IndexSet, Layout, VectorIndex
from service.merge import merge_topk

# FAISS's default nprobe is 1; a fine grid, so that "the cheapest merged setting at least as accurate as the one
# index" (`_equal_recall`) is not decided by the grid's coarseness
IVF_PARAMS = tuple(f"nprobe={p}" for p in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32))


def _indexes(
    rng: np.random.Generator, vecs: np.ndarray, old_vecs: np.ndarray, factory: str
) -> tuple[VectorIndex, IndexSet, np.ndarray]:
    """One index over every item, the OLD/NEW pair each holding a random half, and NEW's ids."""
    n = len(vecs)
    d_new, d_old = vecs.shape[1], old_vecs.shape[1]
    ids = np.arange(n, dtype=np.int64)
    single = VectorIndex(d_new, factory, space="v2")
    single.add(ids, vecs)
    half = n // 2
    pair = IndexSet(
        Layout(serving="v1", rollout_id=1, from_model="v1", to_model="v2", mode="reverse"),
        new=VectorIndex(d_new, factory, space="v2"),
        old=VectorIndex(d_old, factory, space="v1"),
    )
    perm = rng.permutation(n)
    pair.apply(to_old=(ids[perm[half:]], old_vecs[perm[half:]]))
    pair.apply(to_new=(ids[perm[:half]], vecs[perm[:half]]))
    return single, pair, np.sort(ids[perm[:half]])


def _set_params(indexes: list[VectorIndex], params: str) -> None:
    for ix in indexes:
        ix.set_search_params(params)


def _exact(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top k of `queries` among `base` rows (item ids `ids`): the reference for recall."""
    flat = faiss.IndexFlatL2(base.shape[1])
    flat.add(np.ascontiguousarray(base, dtype=np.float32))
    d, pos = flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return d, np.where(pos >= 0, ids[np.clip(pos, 0, None)], -1)


def _query_batches(
    rng: np.random.Generator,
    n_queries: int,
    batch: int,
    d_new: int,
    d_old: int,
    queries: np.ndarray | None,
    old_queries: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(n_queries, batch, d) queries in NEW's space and the same ones in OLD's."""
    total = n_queries * batch
    if queries is None:
        qs = unit(rng, total, d_new)
        qo = qs if d_old == d_new else unit(rng, total, d_old)
    else:
        pick = rng.choice(len(queries), size=total, replace=total > len(queries))
        qs = np.ascontiguousarray(queries[pick], dtype=np.float32)
        qo = qs if old_queries is None else np.ascontiguousarray(old_queries[pick], dtype=np.float32)
    return qs.reshape(n_queries, batch, d_new), qo.reshape(n_queries, batch, d_old)


def _check_exact(single: VectorIndex, pair: IndexSet, queries_b: np.ndarray, k: int) -> None:
    """Flat, one space, identity calibration: the merge equals the single index."""
    for i in range(3):
        (nd, ni), old = pair.search(queries_b[i], queries_b[i], k)
        assert old is not None
        m = merge_topk(nd, ni, old[0], old[1], k)
        _, si = single.search(queries_b[i], k)
        assert [[h.item_id for h in row] for row in m] == si.tolist()


_STAND_IN_X = np.linspace(0, 4, 16)
_STAND_IN_Y = _STAND_IN_X * 0.9


def _stand_in_calibration(x: np.ndarray) -> np.ndarray:
    """A monotone calibration (OLD distances -> NEW scale), as CompatPack.calibrate applies it."""
    return np.interp(x, _STAND_IN_X, _STAND_IN_Y).astype(np.float32)


def bench_merge(
    n: int,
    n_queries: int,
    k: int,
    batch: int,
    d: int = 64,
    seed: int = 0,
    *,
    factory: str = "Flat",
    search_params: tuple[str, ...] = ("",),
    data: str = "unit",
    vecs: np.ndarray | None = None,
    old_vecs: np.ndarray | None = None,
    queries: np.ndarray | None = None,
    old_queries: np.ndarray | None = None,
    calibrate: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[dict[str, object]]:
    """Merged OLD+NEW halves vs one index over all `n` items, timed interleaved: a row per search setting.

    Defaults: `n` synthetic vectors (d; `data` "unit": random unit vectors, "clustered": around 4,096 unit
    centres), queries drawn the same way, a monotone stand-in calibration. Callers may pass real data
    instead: `vecs` (n, d_new) in the query model's space (the one-index baseline and the NEW half),
    `old_vecs` (n, d_old) for the OLD half (default `vecs`), `queries` (>= n_queries*batch, d_new) and
    `old_queries` (the same queries in OLD's space, e.g. psi(q)), and `calibrate` (OLD distances -> NEW
    scale). `factory` is any `VectorIndex` factory (Flat, IVF<n>,Flat, HNSW<m>); the indices are built once
    and timed under each of `search_params` (e.g. "nprobe=8"; "" = FAISS's defaults). Each row carries the
    recall@k of the one index and of the merge against their exact answers over the same items."""
    rng = np.random.default_rng(seed)
    centers = unit_centers(d) if data == "clustered" else None

    def draw(m: int) -> np.ndarray:
        return unit(rng, m, d) if centers is None else clustered(rng, m, d, centers)

    vecs = draw(n) if vecs is None else np.ascontiguousarray(vecs[:n], dtype=np.float32)
    old_vecs = vecs if old_vecs is None else np.ascontiguousarray(old_vecs[:n], dtype=np.float32)
    single, pair, new_ids = _indexes(rng, vecs, old_vecs, factory)
    if queries is None:
        queries = draw(n_queries * batch)
        old_queries = queries if old_vecs.shape[1] == vecs.shape[1] else unit(rng, n_queries * batch, old_vecs.shape[1])
    queries_b, old_b = _query_batches(rng, n_queries, batch, vecs.shape[1], old_vecs.shape[1], queries, old_queries)
    cal = calibrate or _stand_in_calibration

    def one(i: int) -> list[list[Any]]:
        d_, i_ = single.search(queries_b[i], k)
        return merge_topk(d_, i_, None, None, k)  # the same result shaping as the merged path

    def merged(i: int) -> list[list[Any]]:
        (nd, ni), old = pair.search(queries_b[i], old_b[i], k)
        assert old is not None
        od, oi = old
        return merge_topk(nd, ni, cal(od), oi, k)  # as service/runtime.py: the merge drops empty slots (id -1)

    truth_one, truth_merged = _truths(vecs, old_vecs, new_ids, queries_b, old_b, cal, k)

    if factory.strip().upper() == "FLAT" and old_vecs is vecs and calibrate is None and data == "unit":
        _check_exact(single, pair, queries_b, k)
    rows: list[dict[str, object]] = []
    for params in search_params:
        _set_params([single, *(ix for ix in (pair.new, pair.old) if isinstance(ix, VectorIndex))], params)
        t_single, t_merged = time_pair(one, merged, n_queries, warmup=min(20, max(2, n_queries // 5)))
        found_one = [[h.item_id for h in row] for i in range(n_queries) for row in one(i)]
        found_merged = [[h.item_id for h in row] for i in range(n_queries) for row in merged(i)]
        rows.append(
            {
                "items": n,
                "factory": factory,
                "search_params": params or "default",
                "batch": batch,
                "k": k,
                "queries": n_queries,
                **_timings(t_single, t_merged),
                "single_recall": recall_at(found_one, truth_one, k),
                "merged_recall": recall_at(found_merged, truth_merged, k),
            }
        )
    if len(rows) > 1:
        _equal_recall(rows)
    return rows


def _truths(
    vecs: np.ndarray,
    old_vecs: np.ndarray,
    new_ids: np.ndarray,
    queries_b: np.ndarray,
    old_b: np.ndarray,
    cal: Callable[[np.ndarray], np.ndarray],
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact answers over the same items: the one index's, and the merge of both halves' exact top k."""
    ids = np.arange(len(vecs), dtype=np.int64)
    in_new = np.isin(ids, new_ids)
    qs, qo = queries_b.reshape(-1, vecs.shape[1]), old_b.reshape(-1, old_vecs.shape[1])
    truth_one = _exact(vecs, ids, qs, k)[1]
    nd, ni = _exact(vecs[in_new], ids[in_new], qs, k)
    od, oi = _exact(old_vecs[~in_new], ids[~in_new], qo, k)
    return truth_one, np.array([[h.item_id for h in row] for row in merge_topk(nd, ni, cal(od), oi, k)])


def _timings(t_single: list[float], t_merged: list[float]) -> dict[str, float]:
    return {
        "single_p50_ms": ms(t_single, 0.5),
        "single_p95_ms": ms(t_single, 0.95),
        "merged_p50_ms": ms(t_merged, 0.5),
        "merged_p95_ms": ms(t_merged, 0.95),
        "ratio_p50": statistics.median(t_merged) / statistics.median(t_single),
        "ratio_mean": statistics.fmean(t_merged) / statistics.fmean(t_single),
    }


def _equal_recall(rows: list[dict[str, object]]) -> None:
    """For each setting of the one index: the cheapest (p50) merged setting whose recall is at least the one
    index's, and its latency over the one index's (None where no merged setting reaches that recall)."""
    for r in rows:
        ok = [m for m in rows if float(m["merged_recall"]) >= float(r["single_recall"])]  # type: ignore[arg-type]
        best = min(ok, key=lambda m: float(m["merged_p50_ms"])) if ok else None  # type: ignore[arg-type]
        r["equal_recall_params"] = best["search_params"] if best else None
        r["equal_recall_merged_p50_ms"] = best["merged_p50_ms"] if best else None
        r["equal_recall_ratio_p50"] = (
            float(best["merged_p50_ms"]) / float(r["single_p50_ms"]) if best else None  # type: ignore[arg-type]
        )


def _real_rows(cfg: BenchConfig, art: Artifacts) -> list[dict[str, Any]]:
    """NEW = v2 vectors, OLD = v1 vectors searched with psi(v2(q)), calibrated OLD distances."""
    from models.artifacts import load_compat, load_encoder

    rows: list[dict[str, Any]] = []
    n = cfg.size("real_n")
    images, _, data = fashion_test(cfg, n)
    v1, v2 = load_encoder(art.dirs["v1"]), load_encoder(art.dirs["v2"])
    pack = load_compat(art.dirs["compat"])
    g_new, g_old = v2.embed(images), v1.embed(images)
    q_old = pack.reverse(g_new)
    for factory in ("Flat", "IVF1024,Flat"):
        for batch in (1, 32):
            for r in bench_merge(
                len(images),
                cfg.q(300, 20) if batch == 1 else cfg.q(60, 5),
                cfg.k,
                batch,
                factory=factory,
                vecs=g_new,
                old_vecs=g_old,
                queries=g_new,
                old_queries=q_old,
                calibrate=lambda d: pack.calibrate("reverse", d),
            ):
                rows.append({"data": f"{data} ({len(images):,}) embedded v1/v2", **r})
    return rows


def section_merge(cfg: BenchConfig, art: Artifacts) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if art.shipped:
        rows += _real_rows(cfg, art)
    else:
        notes.append(f"real-gallery rows skipped: shipped artifacts not found under {cfg.artifacts}")
    n = cfg.size("synth_n")
    big = n >= 500_000
    for batch in (1, 32):
        nq = (cfg.q(60, 10) if big else cfg.q(300, 20)) if batch == 1 else (cfg.q(12, 3) if big else cfg.q(60, 5))
        for r in bench_merge(n, nq, cfg.k, batch, 64, factory="Flat"):
            rows.append({"data": f"synthetic random unit d=64 ({n:,})", **r})
    for batch in (1, 32):
        nq = cfg.q(300, 20) if batch == 1 else cfg.q(30, 5)
        for r in bench_merge(
            n, nq, cfg.k, batch, 64, factory="IVF1024,Flat", data="clustered", search_params=IVF_PARAMS
        ):
            rows.append({"data": f"synthetic clustered d=64 ({n:,})", **r})
    notes.append(
        "IVF: the service's VectorIndex (exact until 39 x nlist vectors, then trained on all), clustered data "
        "(4,096 centres), the same nprobe on both halves and on the one index; recall@k of each against its exact "
        "answer over the same items. Per query, the merge adds a second coarse quantizer and visits twice as many "
        "lists holding half as many items each, so at the same nprobe it costs more than the one index but "
        "finds more (each half keeps its own top k). 'equal recall': the cheapest merged nprobe whose recall is at "
        "least the one index's, and its p50 over the one index's. Section 9 measures the merge at 10M"
    )
    return {"rows": rows, "notes": notes}
