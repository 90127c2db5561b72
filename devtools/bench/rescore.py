"""The reverse path's re-scoring, what it costs: `IndexSet.search` on the reverse path with and without
re-scoring OLD's candidates in the new space (service/rescore.py), interleaved, one thread, half the gallery
backfilled; p50 latency at batch 1 and 32 and the memory the per-item h(v1) store adds.

    python -m devtools.bench.rescore [--items 10000 100000] [--queries 400]

Synthetic unit vectors (d_old = 32, d_new = 64, the shipped pair's dimensions); exact (Flat) indices.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np

from devtools.bench.common import ms, time_pair, unit
from models.evaluate import RESCORE_DEPTH
from service.index import IndexSet, Layout, VectorIndex
from service.rescore import ItemVectors

LAYOUT = Layout(serving="v1", rollout_id=1, from_model="v1", to_model="v2", mode="reverse")


def _sets(n: int, d_old: int, d_new: int, seed: int = 0) -> tuple[IndexSet, IndexSet]:
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64)
    v1, v2, h = unit(rng, n, d_old), unit(rng, n, d_new), unit(rng, n, d_new)
    plain = IndexSet(LAYOUT, new=VectorIndex(d_new), old=VectorIndex(d_old))
    scored = IndexSet(
        LAYOUT,
        new=VectorIndex(d_new),
        old=VectorIndex(d_old),
        rescore_vectors=ItemVectors(d_new),
        rescore_depth=RESCORE_DEPTH,
    )
    for s in (plain, scored):
        s.apply(to_old=(ids, v1), old_rescore=h if s is scored else None)
        s.apply(to_new=(ids[: n // 2], v2[: n // 2]))
    return plain, scored


def _searcher(s: IndexSet, qn: np.ndarray, qo: np.ndarray, batch: int, queries: int, k: int) -> Callable[[int], object]:
    def search(i: int) -> object:
        j = (i % queries) * batch
        return s.search(qn[j : j + batch], qo[j : j + batch], k)

    return search


def run(n: int, queries: int, k: int = 100) -> list[str]:
    d_old, d_new = 32, 64
    plain, scored = _sets(n, d_old, d_new)
    rng = np.random.default_rng(1)
    rows = []
    for batch in (1, 32):
        qn, qo = unit(rng, queries * batch, d_new), unit(rng, queries * batch, d_old)
        a, b_ = (_searcher(s, qn, qo, batch, queries, k) for s in (plain, scored))
        ta, tb = time_pair(a, b_, queries)
        pa, pb = ms(ta, 0.5), ms(tb, 0.5)
        rows.append(f"| {n:,} | {batch} | {pa:.3f} | {pb:.3f} | {pb / pa:.2f} |")
    extra = (n - n // 2) * d_new * 4
    rows.append(
        f"| {n:,} | memory | h(v1) store for {n - n // 2:,} OLD items: {extra / 2**20:.1f} MiB "
        f"({d_new * 4} B per item) | | |"
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--queries", type=int, default=400)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"Reverse path, half backfilled, k = 100, re-scoring depth {RESCORE_DEPTH}:")
    print("| items | batch | psi only p50 ms | re-scored p50 ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for n in args.items:
        for row in run(n, args.queries):
            print(row, flush=True)


if __name__ == "__main__":
    main()
