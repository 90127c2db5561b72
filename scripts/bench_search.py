"""Query-path benchmark, measured now and side by side in one run.

1. Merged search over OLD + NEW halves (two FAISS searches, calibration, distance-rank merge) vs one
   index holding every item: same gallery, same queries, interleaved. Target: latency ratio <= 1.15.
2. Query encoding single-pass (v2 + psi) vs two-pass (v2 + v1) with the shipped artifacts. Target: cost
   ratio <= 0.6. Skipped (and said so) when artifacts/{v1,v2,compat-v1-v2} are missing.

Prints a markdown table and writes runs/bench/search.json.

    .venv/bin/python scripts/bench_search.py [--sizes 10000 100000] [--queries 500]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.index import IndexSet, Layout, VectorIndex  # noqa: E402
from service.merge import merge_topk  # noqa: E402


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def time_pair(
    a: Callable[[int], object], b: Callable[[int], object], n: int, warmup: int = 20
) -> tuple[list[float], list[float]]:
    """Interleave a and b (alternating which goes first) so drift and noise hit both alike."""
    for i in range(warmup):
        a(i)
        b(i)
    ta: list[float] = []
    tb: list[float] = []
    for i in range(n):
        first, second, t1, t2 = (a, b, ta, tb) if i % 2 == 0 else (b, a, tb, ta)
        t0 = time.perf_counter()
        first(i)
        t1.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        second(i)
        t2.append(time.perf_counter() - t0)
    return ta, tb


def ms(xs: list[float], q: float) -> float:
    return float(np.quantile(xs, q) * 1000)


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
    total = n_queries * batch
    if queries is None:
        qs = unit(rng, total, d_new)
        qo = qs if d_old == d_new else unit(rng, total, d_old)
    else:
        pick = rng.choice(len(queries), size=total, replace=total > len(queries))
        qs = np.ascontiguousarray(queries[pick], dtype=np.float32)
        qo = qs if old_queries is None else np.ascontiguousarray(old_queries[pick], dtype=np.float32)
    queries_b = qs.reshape(n_queries, batch, d_new)
    old_b = qo.reshape(n_queries, batch, d_old)
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

    # Exactness check (Flat, one space): with identity calibration the merge equals the single index.
    if factory.strip().upper() == "FLAT" and old_vecs is vecs and queries is None:
        for i in range(3):
            (nd, ni), old = pair.search(queries_b[i], queries_b[i], k)
            assert old is not None
            m = merge_topk(nd, ni, old[0], old[1], k)
            _, si = single.search(queries_b[i], k)
            assert [[h.item_id for h in row] for row in m] == si.tolist()

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


def bench_encode(artifacts: Path, n_queries: int, batch: int) -> dict[str, object] | None:
    from models.artifacts import load_compat, load_encoder

    dirs = [artifacts / "v1", artifacts / "v2", artifacts / "compat-v1-v2"]
    if not all((p / "manifest.json").is_file() for p in dirs):
        return None
    v1, v2 = load_encoder(dirs[0]), load_encoder(dirs[1])
    pack = load_compat(dirs[2])
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(n_queries, batch, 28, 28), dtype=np.uint8)

    def single_pass(i: int) -> object:
        return pack.reverse(v2.embed(imgs[i]))

    def two_pass(i: int) -> object:
        return v2.embed(imgs[i]), v1.embed(imgs[i])

    t1, t2 = time_pair(single_pass, two_pass, n_queries, warmup=min(10, n_queries))
    return {
        "batch": batch,
        "single_pass_p50_ms": ms(t1, 0.5),
        "two_pass_p50_ms": ms(t2, 0.5),
        "ratio_p50": statistics.median(t1) / statistics.median(t2),
        "ratio_mean": statistics.fmean(t1) / statistics.fmean(t2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    ap.add_argument("--threads", type=int, default=1, help="FAISS/torch threads (1 = least noise on a shared box)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "search.json")
    args = ap.parse_args()
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)

    merge_rows = []
    for n in args.sizes:
        for batch in (1, 32):
            merge_rows.append(bench_merge(n, args.queries if batch == 1 else max(50, args.queries // 5), args.k, batch))
    enc_rows = [r for b in (1, 32) if (r := bench_encode(args.artifacts, 200 if b == 1 else 50, b)) is not None]

    print(f"## Merged OLD+NEW search vs one index (Flat, d=64, k={args.k}, {args.threads} thread(s))\n")
    print("Target: ratio <= 1.15.\n")
    print("| items | batch | one p50 (ms) | merged p50 (ms) | one p95 | merged p95 | ratio p50 | ratio mean |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in merge_rows:
        print(
            f"| {r['items']:,} | {r['batch']} | {r['single_p50_ms']:.3f} | {r['merged_p50_ms']:.3f} | "
            f"{r['single_p95_ms']:.3f} | {r['merged_p95_ms']:.3f} | {r['ratio_p50']:.3f} | "
            f"{r['ratio_mean']:.3f} |"
        )
    print("\n## Query encoding: single pass (v2 + psi) vs two passes (v2 + v1) (target ratio <= 0.6)\n")
    if not enc_rows:
        print(f"skipped: shipped artifacts not found under {args.artifacts} (v1, v2, compat-v1-v2)")
    else:
        print("| batch | v2 + psi p50 (ms) | v2 + v1 p50 (ms) | ratio p50 | ratio mean |")
        print("|---:|---:|---:|---:|---:|")
        for r in enc_rows:
            print(
                f"| {r['batch']} | {r['single_pass_p50_ms']:.3f} | {r['two_pass_p50_ms']:.3f} | "
                f"{r['ratio_p50']:.3f} | {r['ratio_mean']:.3f} |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {
                    "python": platform.python_version(),
                    "cpu": platform.processor() or platform.machine(),
                    "threads": args.threads,
                },
                "merge": merge_rows,
                "encode": enc_rows or None,
                "encode_skipped": None if enc_rows else f"no artifacts under {args.artifacts}",
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
