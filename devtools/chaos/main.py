"""The chaos run's command line: `python -m devtools.chaos` (or `scripts/chaos.py`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from devtools.chaos.config import Config
from devtools.chaos.env import REPO
from devtools.chaos.run import run
from devtools.chaos.verify import table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Chaos run on real Postgres and Redis: a rollout survives worker SIGKILLs, API restarts, a "
        "Redis FLUSHDB\nand a Postgres outage, while a client searches all along."
    )
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--api-restarts", type=int, default=2)
    p.add_argument("--no-redis-flush", action="store_true")
    p.add_argument("--pg-stop-seconds", type=float, default=12.0)
    p.add_argument("--no-pg-stop", action="store_true")
    p.add_argument("--pg-cluster", default="15 main")
    p.add_argument(
        "--db-outage", choices=["pg", "proxy"], default="pg", help="stop the server, or cut a proxy in front of it"
    )
    p.add_argument("--chaos-seconds", type=float, default=60.0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny random artifacts + digits even if artifacts/ exists")
    p.add_argument("--writers", type=int, default=2, help="threads adding items during the rollout (0 = none)")
    p.add_argument("--no-sweep-restart", action="store_true", help="skip the restart after the retention sweep")
    p.add_argument("--keep-db", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "chaos")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    cfg = Config(
        items=a.items,
        kills=a.kills,
        api_restarts=a.api_restarts,
        redis_flush=not a.no_redis_flush,
        pg_stop_seconds=0.0 if a.no_pg_stop else a.pg_stop_seconds,
        pg_cluster=a.pg_cluster,
        db_outage=a.db_outage,
        chaos_seconds=a.chaos_seconds,
        batch_size=a.batch_size,
        seed=a.seed,
        tiny=a.tiny,
        writers=a.writers,
        sweep_restart=not a.no_sweep_restart,
    )
    s = run(cfg, keep_db=a.keep_db, out=a.out)
    print(table(s))
    print(f"wrote {a.out / 'summary.json'}")
    return 0 if s.ok else 1
