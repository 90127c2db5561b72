"""Section 6: offline harness curve time (FAISS top-k) vs the dense-matrix approach (`models/evaluate.py`)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from devtools.bench.common import Artifacts, fashion_test, set_threads
from devtools.bench.config import BenchConfig


def section_harness(cfg: BenchConfig, art: Artifacts) -> dict[str, Any]:
    from models.evaluate import N_POINTS, build_evaluator, dense_point, fractions, n_in_new, policy_order

    if not art.shipped:
        return {"skipped": f"shipped artifacts not found under {cfg.artifacts}"}
    n = cfg.size("real_n")
    images, labels, data = fashion_test(cfg, n)
    set_threads(os.cpu_count() or 1)  # the harness's own setting (FAISS up to 2 threads)
    try:
        ev, sig = build_evaluator(images, labels, art.root)
        order = policy_order("uncertainty", n, sigma=sig["sigma"])
        t0 = time.perf_counter()
        curve = ev.curve(order, "reverse")
        faiss_curve = time.perf_counter() - t0
        picks = np.linspace(0, N_POINTS - 1, cfg.q(3, 1)).round().astype(int)
        fr = fractions()
        t_dense, diffs = 0.0, []
        for p in picks:
            mask = np.zeros(n, bool)
            mask[order[: n_in_new(fr[p], n)]] = True
            t0 = time.perf_counter()
            dm, _ = dense_point(ev, mask, "reverse")
            t_dense += time.perf_counter() - t0
            diffs.append(abs(dm - curve["map"][p]))
    finally:
        set_threads(cfg.threads)
    dense_curve = t_dense / len(picks) * N_POINTS
    return {
        "n": n,
        "data": data,
        "configuration": "reverse / uncertainty, 22 points",
        "faiss_curve_s": faiss_curve,
        "dense_points_timed": len(picks),
        "dense_s_per_point": t_dense / len(picks),
        "dense_curve_s_extrapolated": dense_curve,
        "speedup": dense_curve / faiss_curve,
        "max_abs_map_difference": float(max(diffs)),
    }
