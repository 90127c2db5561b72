"""`python -m worker [--burst] [--name N] [--maintenance-seconds S] [--metrics-port P]`."""

from __future__ import annotations

import argparse

from service.config import get_settings
from worker.main import run_worker


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m worker", description="Run a backfill worker.")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--name", default=None, help="RQ worker name (default: random)")
    p.add_argument("--maintenance-seconds", type=float, default=10.0, help="re-enqueue/retention interval")
    p.add_argument("--metrics-port", type=int, default=None, help="override BACKFILL_METRICS_PORT (0 = off)")
    a = p.parse_args(argv)
    run_worker(
        get_settings(),
        burst=a.burst,
        name=a.name,
        maintenance_seconds=a.maintenance_seconds,
        metrics_port=a.metrics_port,
    )


if __name__ == "__main__":
    main()
