"""A reduced `backfill demo` on real Postgres and Redis: the live curve measured through /search equals the
offline harness computed for the same backfilled items, and its last point is new/new."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.demo import run_demo
from service.config import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_reduced_demo_matches_offline_harness(pg: str, redis_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=pg, redis_url=redis_url, data_dir=tmp_path / "data")
    result = run_demo(settings, tmp_path / "demo", n_items=1000, n_points=5, batch_size=50, progress=False)

    fractions = [p.fraction for p in result.points]
    assert len(result.points) == 5
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    for p in result.points:
        assert abs(p.live_map - p.offline_map) <= 0.01, p
        assert abs(p.live_top1 - p.offline_top1) <= 0.01, p
    assert result.points[-1].live_map == pytest.approx(result.new_new, abs=1e-6)
    # `auto` (the default path) never serves below the old model alone, fraction 0 included
    assert min(p.live_map for p in result.points) >= result.old_old - 0.002
    assert result.points[0].path == result.mode
    for name in ("curve.json", "curve.png", "curve.md"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
