"""Section 3: end-to-end ``POST /search`` (the real app in-process under uvicorn on a loopback port,
scratch Postgres + Redis, during a rollout) vs the bare FAISS searches for the same queries, by stage."""

from __future__ import annotations

import base64
import statistics
from typing import Any

import numpy as np

from devtools.bench.common import ms, time_pair
from devtools.bench.config import BenchConfig
from devtools.bench.live import LiveService


def _stage_totals() -> dict[str, tuple[float, float]]:
    from prometheus_client import REGISTRY

    out = {}
    for st in ("decode", "encode", "search", "merge", "total"):
        s = REGISTRY.get_sample_value("backfill_search_stage_seconds_sum", {"stage": st}) or 0.0
        c = REGISTRY.get_sample_value("backfill_search_stage_seconds_count", {"stage": st}) or 0.0
        out[st] = (s, c)
    s = REGISTRY.get_sample_value("backfill_http_request_seconds_sum", {"route": "/search"}) or 0.0
    c = REGISTRY.get_sample_value("backfill_http_request_seconds_count", {"route": "/search"}) or 0.0
    out["http_middleware"] = (s, c)
    return out


def _stage_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], e2e_mean: float
) -> dict[str, float | None]:
    """Mean ms per request of each stage over the window, plus the client's wall time and the rest."""
    stages: dict[str, float | None] = {}
    for st, (s1, c1) in after.items():
        s0, c0 = before[st]
        stages[st] = (s1 - s0) / (c1 - c0) * 1000 if c1 > c0 else None
    total = stages.get("total") or 0.0
    stages["client_wall"] = e2e_mean
    stages["http_and_framework"] = e2e_mean - total
    return stages


def section_e2e(cfg: BenchConfig, live: LiveService) -> dict[str, Any]:
    import httpx

    from models.preprocess import encode_png

    rt = live.runtime
    ix = rt.current()
    n_q = cfg.q(300, 20)
    rng = np.random.default_rng(7)
    pick = rng.choice(len(live.images), size=n_q, replace=n_q > len(live.images))
    bodies = [{"image_b64": base64.b64encode(encode_png(live.images[i])).decode(), "k": cfg.k} for i in pick]
    q_new, q_old = rt.encode_queries(ix.layout, live.images[pick])  # the same queries, encoded once
    client = httpx.Client(base_url=live.base_url, timeout=30)

    def e2e(i: int) -> object:
        r = client.post("/search", json=bodies[i])
        assert r.status_code == 200, r.text
        return r

    def bare(i: int) -> object:
        return ix.search(q_new[i : i + 1], q_old[i : i + 1], cfg.k)

    for i in range(min(10, n_q)):  # warm-up outside the histograms' window
        e2e(i)
    before = _stage_totals()
    t_e2e, t_bare = time_pair(e2e, bare, n_q, warmup=0)
    after = _stage_totals()
    client.close()
    e2e_mean = statistics.fmean(t_e2e) * 1000
    return {
        "gallery": len(live.item_ids),
        "data": live.data,
        "queries": n_q,
        "layout": "rollout v1 -> v2 (reverse), half backfilled",
        "e2e_p50_ms": ms(t_e2e, 0.5),
        "e2e_p95_ms": ms(t_e2e, 0.95),
        "e2e_mean_ms": e2e_mean,
        "bare_p50_ms": ms(t_bare, 0.5),
        "bare_p95_ms": ms(t_bare, 0.95),
        "bare_mean_ms": statistics.fmean(t_bare) * 1000,
        "overhead_p50_ms": ms(t_e2e, 0.5) - ms(t_bare, 0.5),
        "ratio_p50": statistics.median(t_e2e) / statistics.median(t_bare),
        "stage_mean_ms": _stage_means(before, after, e2e_mean),
    }
