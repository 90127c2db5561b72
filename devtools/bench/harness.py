"""Section 6: offline harness curve time (FAISS top-k) vs the dense-matrix approach (`models/harness.py`)."""

from __future__ import annotations

import os
import time
from typing import Any

from devtools.bench.common import Artifacts, fashion_test, set_threads
from devtools.bench.config import BenchConfig


def section_harness(cfg: BenchConfig, art: Artifacts) -> dict[str, Any]:
    from models.evaluate import N_POINTS, build_evaluator, policy_order
    from models.harness import time_dense_points

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
        per_point, max_diff, points = time_dense_points(ev, order, curve["map"], cfg.q(3, 1))
    finally:
        set_threads(cfg.threads)
    dense_curve = per_point * N_POINTS
    return {
        "n": n,
        "data": data,
        "configuration": "reverse / uncertainty, 22 points",
        "faiss_curve_s": faiss_curve,
        "dense_points_timed": points,
        "dense_s_per_point": per_point,
        "dense_curve_s_extrapolated": dense_curve,
        "speedup": dense_curve / faiss_curve,
        "max_abs_map_difference": max_diff,
    }
