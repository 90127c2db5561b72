"""The benchmark's configuration, its sections and the targets each figure is held to."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
# issue 17's targets (merged / one index <= 1.10 at equal recall, one worker / raw encoder >= 0.9)
MERGE_TARGET, ENCODE_TARGET, WORKER_TARGET, LAG_P99_TARGET, MEMORY_TARGET = 1.10, 0.6, 0.9, 1.0, 1.3


@dataclass
class BenchConfig:
    quick: bool = False
    only: tuple[int, ...] = SECTIONS
    artifacts: Path = REPO / "artifacts"
    out_dir: Path = REPO / "runs" / "bench"
    pg: str = os.environ.get("BACKFILL_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    redis: str = "redis://127.0.0.1:6379/13"
    threads: int = 1
    wait_artifacts: float = 0.0
    update: bool = False  # keep the other sections of an existing results.json
    k: int = 10
    # sizes (None = the full / quick default)
    real_n: int | None = None
    synth_n: int | None = None
    large_n: int | None = None
    e2e_n: int | None = None
    backfill_items: int | None = None
    scale_n: int | None = None
    milvus_n: int | None = None

    def size(self, name: str) -> int:
        full = {
            "real_n": 10_000,
            "synth_n": 1_000_000,
            "large_n": 1_000_000,
            "e2e_n": 10_000,
            "backfill_items": 5_000,
            "scale_n": 1_000_000,
            "milvus_n": 100_000,
        }
        quick = {
            "real_n": 2_000,
            "synth_n": 20_000,
            "large_n": 20_000,
            "e2e_n": 1_000,
            "backfill_items": 300,
            "scale_n": 20_000,
            "milvus_n": 2_000,
        }
        v = getattr(self, name)
        return int(v) if v is not None else (quick if self.quick else full)[name]

    def q(self, full: int, quick: int) -> int:
        return quick if self.quick else full
