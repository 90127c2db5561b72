"""Chaos run on real Postgres and Redis: a rollout survives worker SIGKILLs, API restarts, a Redis FLUSHDB
and a Postgres outage, while a client searches all along.

Set-up: a fresh database on the Postgres server, a gallery (Fashion-MNIST test images with the shipped
artifacts/{v1,v2,compat-v1-v2}; tiny random artifacts + sklearn digits otherwise), two API processes
(`backfill serve`, restarted one at a time, so a client that fails over between them always has one) and
one worker process (`backfill worker`). Then `POST /upgrade` (throttled so the chaos fits inside it) and,
during the rollout: SIGKILL the worker at random moments (restarted each time), restart each API once
(with the rollout paused, a fixed query set is answered identically before and after the restart), FLUSHDB
the Redis database, and stop Postgres for >= 10 s (`pg_ctlcluster stop|start`). A thread searches
continuously and counts statuses.

Asserted at the end: the rollout completes; the target model's embeddings are exactly the live items (no
loss, no duplicates); no task is pending or leased; every search got a 2xx, or a 503 only while Postgres
was down (counted separately); the before/after-restart answers are equal. Prints a summary table and
writes runs/chaos/summary.json.

    .venv/bin/python -m devtools.chaos [--items 3000] [--kills 12] [--no-pg-stop] [--keep-db]

(`scripts/chaos.py` is the same command.) Postgres is stopped with
`pg_ctlcluster --skip-systemctl-redirect 15 main stop` (override the version and cluster with
--pg-cluster "15 main"); it is always started again, also on failure or Ctrl-C.

Modules: `env` (constants, artifacts, gallery, scratch database, Redis), `procs` (the API and worker
subprocesses), `faults` (Postgres stop, TCP proxy cut), `searcher`, `ops` (operator calls, API restart),
`run`, `verify` (end checks, summary table), `main` (the command line).
"""

from __future__ import annotations

from devtools.chaos.config import Config, Summary
from devtools.chaos.env import (
    AUTH,
    REDIS_URL,
    REPO,
    TOKEN,
    create_database,
    drop_database,
    flush_redis,
    gallery,
    log,
    seed,
    shipped_artifacts,
)
from devtools.chaos.faults import DbProxy, Postgres
from devtools.chaos.main import main
from devtools.chaos.procs import Api, Proc, Stack, Worker
from devtools.chaos.run import run
from devtools.chaos.searcher import Searcher
from devtools.chaos.verify import table

__all__ = [
    "AUTH",
    "REDIS_URL",
    "REPO",
    "TOKEN",
    "Api",
    "Config",
    "DbProxy",
    "Postgres",
    "Proc",
    "Searcher",
    "Stack",
    "Summary",
    "Worker",
    "create_database",
    "drop_database",
    "flush_redis",
    "gallery",
    "log",
    "main",
    "run",
    "seed",
    "shipped_artifacts",
    "table",
]
