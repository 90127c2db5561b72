"""Section 2: query encoding single pass (v2 + psi) vs two passes (v2 + v1) with the given artifacts.

Target: cost ratio <= 0.6. Skipped (and said so) when artifacts/{v1,v2,compat-v1-v2} are missing.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from devtools.bench.common import Artifacts, ms, time_pair
from devtools.bench.config import BenchConfig


def bench_encode(artifacts: Path, n_queries: int, batch: int) -> dict[str, object] | None:
    from models.artifacts import load_compat, load_encoder

    dirs = [artifacts / "v1", artifacts / "v2", artifacts / "compat-v1-v2"]
    if not all((p / "manifest.json").is_file() for p in dirs):
        return None
    v1, v2 = load_encoder(dirs[0]), load_encoder(dirs[1])
    pack = load_compat(dirs[2])
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(n_queries, batch, 28, 28), dtype=np.uint8)

    def single_pass(i: int) -> object:
        return pack.reverse(v2.embed(imgs[i]))

    def two_pass(i: int) -> object:
        return v2.embed(imgs[i]), v1.embed(imgs[i])

    t1, t2 = time_pair(single_pass, two_pass, n_queries, warmup=min(10, n_queries))
    return {
        "batch": batch,
        "single_pass_p50_ms": ms(t1, 0.5),
        "two_pass_p50_ms": ms(t2, 0.5),
        "ratio_p50": statistics.median(t1) / statistics.median(t2),
        "ratio_mean": statistics.fmean(t1) / statistics.fmean(t2),
    }


def section_encode(cfg: BenchConfig, art: Artifacts) -> dict[str, Any]:
    rows = []
    for batch in (1, 32):
        r = bench_encode(art.root, cfg.q(200, 20) if batch == 1 else cfg.q(50, 5), batch)
        if r is not None:
            rows.append(r)
    return {"rows": rows, "artifacts": art.label}
