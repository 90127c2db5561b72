"""Section 1: merged OLD+NEW search vs one index over all items.

Real gallery (Fashion-MNIST test embedded with the shipped v1/v2, OLD queried with psi(v2(q)) and
calibrated) and synthetic d=64 vectors, Flat and IVF. Target: latency ratio <= 1.15.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

from devtools.bench.common import Artifacts, fashion_test, ms, time_pair, unit
from devtools.bench.config import BenchConfig
from service.index import IndexSet, Layout, VectorIndex
from service.merge import merge_topk


def _indexes(
    rng: np.random.Generator, vecs: np.ndarray, old_vecs: np.ndarray, factory: str
) -> tuple[VectorIndex, IndexSet]:
    """One index over every item, and the OLD/NEW pair each holding a random half."""
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
    return single, pair


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


def bench_merge(
    n: int,
    n_queries: int,
    k: int,
    batch: int,
    d: int = 64,
    seed: int = 0,
    *,
    factory: str = "Flat",
    vecs: np.ndarray | None = None,
    old_vecs: np.ndarray | None = None,
    queries: np.ndarray | None = None,
    old_queries: np.ndarray | None = None,
    calibrate: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, object]:
    """Merged OLD+NEW halves vs one index over all `n` items, timed interleaved.

    Defaults: `n` random unit vectors (d), random queries, a monotone stand-in calibration. Callers may
    pass real data instead: `vecs` (n, d_new) in the query model's space (the one-index baseline and the
    NEW half), `old_vecs` (n, d_old) for the OLD half (default `vecs`), `queries` (>= n_queries*batch,
    d_new) and `old_queries` (the same queries in OLD's space, e.g. psi(q)), and `calibrate` (OLD
    distances -> NEW scale). `factory` is any `VectorIndex` factory (Flat, IVF<n>,Flat, HNSW<m>)."""
    rng = np.random.default_rng(seed)
    vecs = unit(rng, n, d) if vecs is None else np.ascontiguousarray(vecs[:n], dtype=np.float32)
    old_vecs = vecs if old_vecs is None else np.ascontiguousarray(old_vecs[:n], dtype=np.float32)
    single, pair = _indexes(rng, vecs, old_vecs, factory)
    queries_b, old_b = _query_batches(rng, n_queries, batch, vecs.shape[1], old_vecs.shape[1], queries, old_queries)
    knots_x = np.linspace(0, 4, 16)
    knots_y = knots_x * 0.9  # a monotone calibration, as CompatPack.calibrate applies it

    def cal(x: np.ndarray) -> np.ndarray:
        if calibrate is not None:
            return calibrate(x)
        return np.interp(x, knots_x, knots_y).astype(np.float32)

    def one(i: int) -> object:
        d_, i_ = single.search(queries_b[i], k)
        return merge_topk(d_, i_, None, None, k)  # the same result shaping as the merged path

    def merged(i: int) -> object:
        (nd, ni), old = pair.search(queries_b[i], old_b[i], k)
        assert old is not None
        od, oi = old
        od = np.where(oi < 0, np.inf, cal(np.where(oi < 0, 0.0, od)))
        return merge_topk(nd, ni, od, oi, k)

    if factory.strip().upper() == "FLAT" and old_vecs is vecs and queries is None:
        _check_exact(single, pair, queries_b, k)
    t_single, t_merged = time_pair(one, merged, n_queries, warmup=min(20, max(2, n_queries // 5)))
    return {
        "items": n,
        "factory": factory,
        "batch": batch,
        "k": k,
        "queries": n_queries,
        "single_p50_ms": ms(t_single, 0.5),
        "single_p95_ms": ms(t_single, 0.95),
        "merged_p50_ms": ms(t_merged, 0.5),
        "merged_p95_ms": ms(t_merged, 0.95),
        "ratio_p50": statistics.median(t_merged) / statistics.median(t_single),
        "ratio_mean": statistics.fmean(t_merged) / statistics.fmean(t_single),
    }


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
            r = bench_merge(
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
            )
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
    for factory in ("Flat", "IVF1024,Flat"):
        for batch in (1, 32):
            nq = (cfg.q(60, 10) if big else cfg.q(300, 20)) if batch == 1 else (cfg.q(12, 3) if big else cfg.q(60, 5))
            r = bench_merge(n, nq, cfg.k, batch, 64, factory=factory)
            rows.append({"data": f"synthetic random unit d=64 ({n:,})", **r})
    notes.append(
        "IVF: the service's VectorIndex (exact until 39 x nlist vectors, then trained on all; nprobe = FAISS default 1)"
    )
    return {"rows": rows, "notes": notes}
