"""The chaos run's end checks (the database's truth and the searcher's record) and its summary table."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import sqlalchemy as sa

from devtools.chaos.config import Summary
from devtools.chaos.searcher import Searcher

_DIFFERING = (
    "SELECT count(*) FROM (SELECT id FROM items WHERE deleted_at IS NULL "
    "EXCEPT SELECT item_id FROM embeddings WHERE model_version = 'v2') a",
    "SELECT count(*) FROM (SELECT item_id FROM embeddings WHERE model_version = 'v2' "
    "EXCEPT SELECT id FROM items WHERE deleted_at IS NULL) b",
)


def _check_database(database_url: str, s: Summary) -> None:
    """v2 embeddings are exactly the live items; every task of the rollout is done."""
    eng = sa.create_engine(database_url)
    with eng.connect() as c:
        s.live_items = int(c.execute(sa.text("SELECT count(*) FROM items WHERE deleted_at IS NULL")).scalar_one())
        s.v2_rows, s.v2_distinct_items = (
            int(x)
            for x in c.execute(
                sa.text("SELECT count(*), count(DISTINCT item_id) FROM embeddings WHERE model_version = 'v2'")
            ).one()
        )
        missing_or_extra = sum(int(c.execute(sa.text(q)).scalar_one()) for q in _DIFFERING)
        if s.rollout_id is not None:
            rows: Any = c.execute(
                sa.text("SELECT state, count(*) FROM backfill_tasks WHERE rollout_id = :r GROUP BY state"),
                {"r": s.rollout_id},
            ).all()
            s.tasks = {"pending": 0, "leased": 0, "done": 0, "failed": 0} | {str(k): int(v) for k, v in rows}
    eng.dispose()
    s.v2_equals_live = missing_or_extra == 0 and s.v2_rows == s.v2_distinct_items == s.live_items
    if not s.v2_equals_live:
        s.problems.append(
            f"v2 embeddings != live items (rows {s.v2_rows}, distinct {s.v2_distinct_items}, "
            f"live {s.live_items}, differing {missing_or_extra})"
        )
    if s.tasks.get("pending", 0) or s.tasks.get("leased", 0) or s.tasks.get("failed", 0):
        s.problems.append(f"tasks not all done: {s.tasks}")


def _check_searches(searcher: Searcher, s: Summary) -> None:
    """Every search 2xx, or 503 while the database was down; every rollout read likewise."""
    statuses: Counter[str] = Counter()
    for _, status, pg_down in searcher.records:
        if 200 <= status < 300:
            s.search_2xx += 1
        elif status == 503 and pg_down:
            s.search_503_pg_down += 1
        else:
            statuses[str(status)] += 1
    s.searches = len(searcher.records)
    s.search_other = dict(statuses)
    s.search_failovers = searcher.failovers
    if searcher.latencies:
        s.search_p50_ms = round(1000 * float(np.percentile(searcher.latencies, 50)), 1)
        s.search_p99_ms = round(1000 * float(np.percentile(searcher.latencies, 99)), 1)
    s.search_errors = searcher.errors
    s.rollout_reads = dict(searcher.reads)
    bad_reads = {k: v for k, v in searcher.reads.items() if k not in ("2xx", "503 pg outage")}
    if bad_reads:
        s.problems.append(f"GET /rollouts/{{id}} answered {bad_reads}")
    if statuses:
        s.problems.append(f"searches with other statuses (0 = no API answered): {dict(statuses)}")
    if s.searches == 0:
        s.problems.append("no searches were made")


def verify(database_url: str, s: Summary, searcher: Searcher | None) -> None:
    _check_database(database_url, s)
    if searcher is not None:
        _check_searches(searcher, s)


def table(s: Summary) -> str:
    rows = [
        ("gallery", f"{s.items} ({s.gallery}; {s.artifacts})"),
        ("rollout", f"{s.rollout_id} {s.rollout_status} in {s.rollout_seconds}s"),
        ("worker SIGKILLs", f"{s.worker_kills} (+{s.worker_unexpected_exits} exits on their own, restarted)"),
        ("API restarts", f"{s.api_restarts}, results equal before/after: {s.restart_results_equal}"),
        ("Redis FLUSHDB", str(s.redis_flushes)),
        ("database outage", f"{s.pg_down_seconds}s ({s.db_outage})"),
        ("tasks", json.dumps(s.tasks)),
        ("v2 rows / distinct / live", f"{s.v2_rows} / {s.v2_distinct_items} / {s.live_items} -> {s.v2_equals_live}"),
        (
            "searches",
            f"{s.searches}: 2xx {s.search_2xx}, 503 while PG down {s.search_503_pg_down}, other {s.search_other}",
        ),
        ("GET /rollouts/{id} reads", json.dumps(s.rollout_reads)),
        ("search latency", f"p50 {s.search_p50_ms} ms, p99 {s.search_p99_ms} ms, failovers {s.search_failovers}"),
        ("writers (POST /items)", f"{s.written_items} items accepted, answers {json.dumps(s.writes)}"),
        ("written items found by self-query", f"{s.written_found} (per API) of {s.written_items}"),
        ("restart after the retention sweep", json.dumps(s.sweep_restart)),
        *([("first errors", " // ".join(s.search_errors[:5]))] if s.search_errors else []),
        ("result", "OK" if s.ok else "FAILED: " + "; ".join(s.problems)),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{w}} | {v} |" for k, v in rows)
