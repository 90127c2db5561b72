"""Section 5: ingestion lag, commit -> searchable in the API's index (Redis event, and polling alone)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from devtools.bench.config import BenchConfig
from devtools.bench.live import LiveService


def _commit_and_wait(maker: Any, live: LiveService, ids: list[int], v2_of: dict[int, np.ndarray], event: bool) -> float:
    """Commit v2 rows for `ids`; seconds until the API's index serves every one of them from NEW."""
    import sqlalchemy as sa

    from service import events
    from service.db.models import Embedding

    rt = live.runtime
    with maker() as s:
        s.execute(
            sa.insert(Embedding),
            [{"item_id": i, "model_version": "v2", "vector": v2_of[i].astype("<f4").tobytes()} for i in ids],
        )
        s.commit()
    t0 = time.perf_counter()
    if event:
        events.publish(rt.redis, events.EMBEDDINGS, count=len(ids))
    deadline = t0 + 30
    while True:
        ix = rt.manager.current
        if ix is not None and ix.side_of(ids[-1]) == "new" and all(i in ix.new for i in ids):
            break
        if time.perf_counter() > deadline:
            raise RuntimeError("ingestion did not catch up within 30 s")
        time.sleep(0.0005)
    return time.perf_counter() - t0


def section_lag(cfg: BenchConfig, live: LiveService) -> dict[str, Any]:
    """Backfill-style commits of v2 rows for OLD items; time from commit until the API's index serves
    them from NEW. With the Redis event (what the worker publishes) and by polling alone."""
    from service.db import make_engine, make_sessionmaker

    rt = live.runtime
    batch = cfg.q(16, 4)
    plan = {"event": cfg.q(100, 10), "poll": cfg.q(30, 4)}
    need = batch * sum(plan.values())
    pool = list(live.old_ids)
    if len(pool) < need:
        batch = max(1, len(pool) // sum(plan.values()))
    v2_of = dict(zip(live.item_ids, live.v2, strict=True))
    engine = make_engine(rt.settings)
    maker = make_sessionmaker(engine)
    rng = np.random.default_rng(3)
    out: dict[str, Any] = {"rows_per_commit": batch, "poll_seconds": rt.settings.ingest_poll_seconds}
    pos = 0
    for mode, samples in plan.items():
        lags = []
        for _ in range(samples):
            ids = pool[pos : pos + batch]
            pos += batch
            if not ids:
                break
            time.sleep(float(rng.uniform(0.0, 0.05)))  # decorrelate from the poll phase
            lags.append(_commit_and_wait(maker, live, ids, v2_of, event=mode == "event"))
        out[mode] = {
            "samples": len(lags),
            "p50_s": float(np.quantile(lags, 0.5)),
            "p99_s": float(np.quantile(lags, 0.99)),
            "max_s": float(max(lags)),
        }
    engine.dispose()
    return out
