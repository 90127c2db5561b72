"""Where a backfill's time goes: seconds and items per stage, summed over batches, from any thread.

The driver's stages record into `WorkerContext.stages` when it is set (the backfill bench sets it; a
running worker leaves it None and pays one attribute check per stage). Stages that run on different
threads overlap, so their seconds add up to more than the wall time of a pipelined run; the bench's
serial profile (`devtools/bench/backfill.py`) runs them one after another to say what each costs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

STAGES = ("rollout", "claim", "load", "decode", "encode", "commit", "write", "event")


class StageClock:
    """Thread-safe totals: stage -> [seconds, calls, items]."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals: dict[str, list[float]] = {}

    def add(self, stage: str, seconds: float, items: int = 0) -> None:
        with self._lock:
            t = self.totals.setdefault(stage, [0.0, 0.0, 0.0])
            t[0] += seconds
            t[1] += 1
            t[2] += items

    @contextmanager
    def time(self, stage: str, items: int = 0) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0, items)

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {k: {"seconds": v[0], "calls": v[1], "items": v[2]} for k, v in self.totals.items()}


@contextmanager
def timed(clock: StageClock | None, stage: str, items: int = 0) -> Iterator[None]:
    """`clock.time(stage)`, or nothing when there is no clock."""
    if clock is None:
        yield
        return
    with clock.time(stage, items):
        yield
