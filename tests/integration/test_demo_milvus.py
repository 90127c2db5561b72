"""The reduced live demo (devtools/demo.py: the API and a worker as processes, queries through /search) with
BACKFILL_INDEX_BACKEND=milvus (shared collections in a milvus-lite file, the API process their writer), and
the same demo on the FAISS backend, on the same small gallery: at every point the Milvus backend's live
curve equals the offline harness (FAISS, exact) on exactly the items the database says were backfilled, and
equals the FAISS backend's live curve within 0.01 wherever both runs paused at the same count (fraction 0
and completion always do)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

pytest.importorskip("pymilvus", reason="the milvus backend needs the `milvus` extra (pymilvus, milvus-lite)")

from devtools.demo import run_demo
from service.config import Settings
from tests.conftest import truncate_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITEMS, POINTS, BATCH = 600, 4, 50
TOLERANCE = 0.01


def test_live_curve_on_milvus_equals_faiss(pg: str, redis_url: str, tmp_path: Path) -> None:
    runs = {}
    for backend in ("faiss", "milvus"):
        truncate_all(pg)
        redis.Redis.from_url(redis_url).flushdb()
        settings = Settings(
            database_url=pg, redis_url=redis_url, data_dir=tmp_path / backend / "data", index_backend=backend
        )
        runs[backend] = run_demo(
            settings, tmp_path / backend, n_items=ITEMS, n_points=POINTS, batch_size=BATCH, progress=False
        )
    fx, mv = runs["faiss"], runs["milvus"]
    assert mv.mode == fx.mode and mv.old_old == fx.old_old and mv.new_new == fx.new_new
    assert (tmp_path / "milvus" / "data" / "milvus.db").exists()  # the API really used the milvus backend
    assert len(mv.points) == POINTS
    for p in mv.points:
        assert abs(p.live_map - p.offline_map) <= TOLERANCE, p
        assert abs(p.live_top1 - p.offline_top1) <= TOLERANCE, p
    same = [(a, b) for a in mv.points for b in fx.points if a.done == b.done]
    assert mv.points[0].done == fx.points[0].done == 0 and mv.points[-1].done == fx.points[-1].done
    for a, b in same:
        assert abs(a.live_map - b.live_map) <= TOLERANCE, (a, b)
        assert abs(a.live_top1 - b.live_top1) <= TOLERANCE, (a, b)
    for name, run in runs.items():
        print(name, [(p.done, round(p.live_map, 6), round(p.offline_map, 6)) for p in run.points])
