"""Section 7: API process memory per item for 1M d=64 vectors vs the raw vector bytes (in a fresh process)."""

from __future__ import annotations

import gc
import multiprocessing as mp
from collections.abc import Callable
from typing import Any

import numpy as np

from devtools.bench.common import clustered, rss_bytes, unit_centers
from devtools.bench.config import BenchConfig


def child_index_memory(n: int, d: int, batch: int, q: Any) -> None:
    """Fresh process: RSS of an IndexManager holding `n` vectors the way the follower fills it."""
    from service.index import IndexManager, IndexSet, Layout, VectorIndex

    rng = np.random.default_rng(11)
    centers = unit_centers(d)
    gc.collect()
    rss0 = rss_bytes()
    manager = IndexManager()
    ix = IndexSet(Layout(serving="v1"), new=VectorIndex(d, "Flat", space="v1"))
    manager.swap(ix)
    for a in range(0, n, batch):
        ids = np.arange(a + 1, min(a + batch, n) + 1, dtype=np.int64)
        ix.apply(to_new=(ids, clustered(rng, len(ids), d, centers)))
        for i in ids.tolist():
            manager.external_ids[i] = f"syn-{i:07d}"
    gc.collect()
    q.put({"rss_before": rss0, "rss_after": rss_bytes(), "rss_peak": rss_bytes("VmHWM"), "vectors": len(ix.new or ())})


def in_child(target: Callable[..., None], *args: Any, timeout: float = 1800) -> dict[str, Any]:
    """Run `target(*args, queue)` in a spawned process; what it put on the queue."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    try:
        res: dict[str, Any] = q.get(timeout=timeout)
    finally:
        p.join(60)
    return res


def section_memory(cfg: BenchConfig) -> dict[str, Any]:
    n, d = cfg.size("large_n"), 64
    r = in_child(child_index_memory, n, d, 5000)
    raw = n * d * 4
    grown = r["rss_after"] - r["rss_before"]
    return {
        "items": n,
        "dim": d,
        "raw_bytes": raw,
        **r,
        "bytes_per_item": grown / n,
        "ratio": grown / raw,
        "peak_ratio": (r["rss_peak"] - r["rss_before"]) / raw,
    }
