"""Section 9's milvus-lite rows: the service's `MilvusIndex` (FLAT) per side at 0, 50 and 100% backfilled, on
its own gallery from the same generator as the FAISS rows (`devtools.bench.scale.Synth`), measured the same way
(recall@10 of the merged result against the exact merged result, one query's p50/p99 with both sides searched
and merged), plus the insert rate and the bytes per item of the milvus-lite files."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from devtools.bench.scale import FRACTIONS, SearchFn, Synth, exact_pass, measure, moved, row, threads_to


def _dir_bytes(path: Any) -> int:
    import os

    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def _searcher(ix: Any, k: int) -> SearchFn:
    def run(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, i = ix.search(q, k)
        return d, i

    return run


def milvus_rows(n: int, k: int, n_queries: int, threads: int) -> dict[str, Any]:
    """The service's `MilvusIndex` (FLAT, milvus-lite) per side at each fraction, on its own `n`-item gallery
    (same generator) with its own exact merged result; rows added in batches of 5,000 (the rebuild's)."""
    import tempfile
    from pathlib import Path

    from service.milvus_index import MilvusSpaces

    syn = Synth(n)
    qn, qo = syn.queries(n_queries)
    qs = {"new": qn, "old": qo}
    threads_to(threads)
    truth = exact_pass(syn, qn, qo, k, None)
    folder = Path(tempfile.mkdtemp(prefix="bench-milvus-"))
    spaces = MilvusSpaces(str(folder / "milvus.db"))
    rows, inserts = [], []
    try:
        for f in FRACTIONS:
            idx = {"new": spaces(syn.d, "v2"), "old": spaces(syn.d, "v1")}
            t0 = time.perf_counter()
            for c in range(syn.chunks):
                ids, x1 = syn.v1(c)
                mv = moved(ids, f)
                for s, sel, x in (("new", mv, syn.v2(x1[mv])), ("old", ~mv, x1[~mv])):
                    for a in range(0, len(x), 5000):
                        idx[s].add(ids[sel][a : a + 5000], x[a : a + 5000])
            secs = time.perf_counter() - t0
            inserts.append({"fraction": f, "seconds": secs, "rows_per_s": n / secs})
            bpi = _dir_bytes(folder) / n
            fns: dict[str, SearchFn] = {s: _searcher(ix, k) for s, ix in idx.items() if len(ix)}
            r = measure(fns, qs, truth.merged[f], k)
            rows.append(row("milvus-lite FLAT", "exact (service MilvusIndex)", f, r, bpi, secs))
            for ix in idx.values():
                ix.close()
    finally:
        spaces.close()
    return {"items": n, "dim": syn.d, "queries": len(qn), "rows": rows, "inserts": inserts, "truth_s": truth.seconds}
