"""A reduced `backfill demo` on real Postgres and Redis, on the shipped pair (artifacts/) and 2,000 Fashion-MNIST
test images (the first ones; the README's live runs use images 5000-7999): the live curve measured through
/search equals the offline harness computed for the same backfilled items, its last point is new/new, and
the curve the service predicted before the rollout (the pack's probe set, the chosen schedule) agrees with
the live one within 0.02 at every point (issue 15).

The gallery size matters to the last check: mAP@100 depends on it (old/old is 0.69 on 1,000 of these images,
0.72 on 2,000, 0.75 on the 5,000-image probe set, 0.78 on 10,000), and the prediction is made on 5,000."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.demo import run_demo
from service.config import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREDICTION_TOLERANCE = 0.02


def test_reduced_demo_matches_offline_harness_and_prediction(pg: str, redis_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=pg, redis_url=redis_url, data_dir=tmp_path / "data")
    result = run_demo(settings, tmp_path / "demo", n_items=2000, n_points=4, batch_size=50, progress=False)

    fractions = [p.fraction for p in result.points]
    assert len(result.points) == 4
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    for p in result.points:
        assert abs(p.live_map - p.offline_map) <= 0.01, p
        assert abs(p.live_top1 - p.offline_top1) <= 0.01, p
    assert result.points[-1].live_map == pytest.approx(result.new_new, abs=1e-6)
    # `auto` (the default path) never serves below the old model alone, fraction 0 included
    assert min(p.live_map for p in result.points) >= result.old_old - 0.002
    assert result.points[0].path == result.mode
    # the prediction the rollout was chosen on, as the rollout resource carries it, against every live point
    assert result.predicted is not None and result.predicted["schedule"][0][1] == result.mode
    for p in result.points:
        predicted = result.predicted_at(p.fraction)
        assert predicted is not None and abs(predicted - p.live_map) <= PREDICTION_TOLERANCE, (p, predicted)
    for name in ("curve.json", "curve.png", "curve.md"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    assert "predicted mAP@100" in (tmp_path / "demo" / "curve.md").read_text()
