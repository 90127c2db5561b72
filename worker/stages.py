"""Where a backfill's time goes: seconds (wall and the calling thread's CPU) and items per stage, summed over
batches, from any thread.

The driver's stages record into `WorkerContext.stages` when it is set (the backfill bench sets it; a
running worker leaves it None and pays one attribute check per stage). Stages that run on different
threads overlap, so their seconds add up to more than the wall time of a pipelined run; the bench's
serial profile (`devtools/bench/backfill.py`) runs them one after another to say what each costs. A stage's
CPU seconds (`time.thread_time`) against its wall seconds say whether it computed or waited (on Postgres, on
the GIL, for a core); the encoder's CPU counts its calling thread only, not torch's other threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

STAGES = ("rollout", "claim", "load", "decode", "encode", "commit", "write", "event")


class StageClock:
    """Thread-safe totals: stage -> [seconds, calls, items, cpu seconds]."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals: dict[str, list[float]] = {}

    def add(self, stage: str, seconds: float, items: int = 0, cpu_seconds: float = 0.0) -> None:
        with self._lock:
            t = self.totals.setdefault(stage, [0.0, 0.0, 0.0, 0.0])
            t[0] += seconds
            t[1] += 1
            t[2] += items
            t[3] += cpu_seconds

    @contextmanager
    def time(self, stage: str, items: int = 0) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0, items, time.thread_time() - c0)

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {
                k: {"seconds": v[0], "calls": v[1], "items": v[2], "cpu_seconds": v[3]} for k, v in self.totals.items()
            }


@contextmanager
def timed(clock: StageClock | None, stage: str, items: int = 0) -> Iterator[None]:
    """`clock.time(stage)`, or nothing when there is no clock."""
    if clock is None:
        yield
        return
    with clock.time(stage, items):
        yield
