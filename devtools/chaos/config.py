"""What a chaos run does (Config) and what it saw (Summary)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Config:
    items: int = 3000
    kills: int = 12
    api_restarts: int = 2
    redis_flush: bool = True
    pg_stop_seconds: float = 12.0  # 0 = no Postgres stop
    pg_cluster: str = "15 main"
    db_outage: str = "pg"  # "pg": stop the Postgres server; "proxy": cut a TCP proxy in front of it (CI-safe)
    chaos_seconds: float = 60.0  # the throttle aims the rollout at roughly this long
    batch_size: int = 50
    slow_reps: int = 30  # tiny artifacts only: makes a batch take measurable time
    seed: int = 0
    compare_queries: int = 20
    complete_timeout: float = 300.0
    tiny: bool = False  # tiny random artifacts + digits even when the shipped artifacts exist
    writers: int = 2  # threads adding new items through POST /items all through the rollout (0 = none)
    write_batch: int = 4
    write_interval: float = 0.2  # seconds between two POST /items of one writer
    sweep_restart: bool = True  # retention 0: after completion, wait for the sweep, restart an API, self-query


@dataclass
class Summary:
    gallery: str = ""
    artifacts: str = ""
    items: int = 0
    worker_kills: int = 0
    worker_unexpected_exits: int = 0
    api_restarts: int = 0
    restart_results_equal: list[bool] = field(default_factory=list)
    redis_flushes: int = 0
    pg_down_seconds: float = 0.0
    db_outage: str = ""
    rollout_id: int | None = None
    rollout_status: str = ""
    rollout_seconds: float = 0.0
    active_through_chaos: bool = False
    tasks: dict[str, int] = field(default_factory=dict)
    v2_rows: int = 0
    v2_distinct_items: int = 0
    live_items: int = 0
    v2_equals_live: bool = False
    searches: int = 0
    search_2xx: int = 0
    search_503_pg_down: int = 0
    search_other: dict[str, int] = field(default_factory=dict)
    search_failovers: int = 0
    search_p50_ms: float = 0.0
    search_p99_ms: float = 0.0
    search_errors: list[str] = field(default_factory=list)
    rollout_reads: dict[str, int] = field(default_factory=dict)
    writes: dict[str, int] = field(default_factory=dict)  # POST /items answers of the writers, by status
    written_items: int = 0  # ids the writers got a 200 for
    written_found: list[int] = field(default_factory=list)  # of them, found by a self-query, per API
    sweep_restart: dict[str, float] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems
