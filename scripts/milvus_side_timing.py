"""One space on the milvus backend (milvus-lite) beside the FAISS Flat side: build, one-query latency, agreement.

    .venv/bin/python scripts/milvus_side_timing.py [N]   (default N = 20000; d = 64, k = 10, 100 queries)

Clustered synthetic vectors are added in batches of 5000 (the rebuild's batch size) to a `VectorIndex("Flat")`
and to a `MilvusIndex` (its flush policy as in the service), then 100 near-duplicate queries are searched one at
a time. Prints build rate, p50/p99 latency, whether both return the same ids and the largest distance
difference, and the bytes per item of the milvus-lite files. The numbers for docs/scale.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

from service.index import VectorIndex
from service.index_backend import SpaceIndex
from service.milvus_index import MilvusSpaces

D, K, BATCH, QUERIES = 64, 10, 5000, 100


def run(n: int) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(256, D)).astype(np.float32)
    x = (centres[rng.integers(0, 256, n)] + 0.3 * rng.normal(size=(n, D))).astype(np.float32)
    ids = np.arange(n, dtype=np.int64)
    q = x[rng.choice(n, QUERIES, replace=False)] + 0.05 * rng.normal(size=(QUERIES, D)).astype(np.float32)
    folder = tempfile.mkdtemp()
    spaces = MilvusSpaces(os.path.join(folder, "milvus.db"))
    sides: dict[str, SpaceIndex] = {"faiss Flat": VectorIndex(D, "Flat", space="v1"), "milvus-lite": spaces(D, "v1")}
    found = {}
    for name, side in sides.items():
        t = time.perf_counter()
        for a in range(0, n, BATCH):
            side.add(ids[a : a + BATCH], x[a : a + BATCH])
        build = time.perf_counter() - t
        lat, hits = [], []
        for row in q:
            t = time.perf_counter()
            hits.append(side.search(row[None], K))
            lat.append((time.perf_counter() - t) * 1e3)
        found[name] = (np.concatenate([h[0] for h in hits]), np.concatenate([h[1] for h in hits]))
        print(
            f"{name}: n={n:,} build {build:.1f} s ({n / build:,.0f} rows/s); one query, k={K}: "
            f"p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms"
        )
    (fd, fi), (md, mi) = found["faiss Flat"], found["milvus-lite"]
    print(f"same ids: {(fi == mi).mean():.4f}; largest distance difference: {np.abs(fd - md).max():.1e}")
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(folder) for f in files)
    print(f"milvus-lite files: {size / n:.0f} B/item")
    spaces.close()


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
