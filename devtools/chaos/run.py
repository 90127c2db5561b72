"""The chaos run: set-up, the schedule of faults during a throttled rollout, completion, checks, clean-up."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import signal
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from devtools.chaos.config import Config, Summary
from devtools.chaos.env import (
    REDIS_URL,
    create_database,
    drop_database,
    flush_redis,
    gallery,
    log,
    seed,
    shipped_artifacts,
)
from devtools.chaos.faults import DbProxy, Postgres
from devtools.chaos.ops import await_progress, op, restart_api, rollout_safe, rollout_view
from devtools.chaos.procs import Api, Stack, Worker
from devtools.chaos.searcher import Searcher
from devtools.chaos.verify import verify
from devtools.chaos.writers import Writer, found_by_self_query, sweep_then_restart
from models.preprocess import encode_png


def schedule(cfg: Config, with_pg: bool) -> list[str]:
    """The chaos schedule: kills spread around the other events."""
    events: list[str] = ["kill"] * cfg.kills
    specials = [f"api:{i}" for i in range(cfg.api_restarts)]
    if cfg.redis_flush:
        specials.append("redis")
    if with_pg:
        specials.append("pg")
    for k, ev in enumerate(specials):
        events.insert(min(len(events), (k + 1) * len(events) // (len(specials) + 1) + k), ev)
    return events


class Chaos:
    """One run's state: the processes, the fault injector, the searcher and the summary."""

    def __init__(self, cfg: Config, stack: Stack | None) -> None:
        self.cfg, self.rng, self.s = cfg, random.Random(cfg.seed), Summary()
        self.own_db = stack is None
        self.tmp = tempfile.TemporaryDirectory(prefix="backfill-chaos-")
        workdir = Path(self.tmp.name)
        art = None if cfg.tiny else shipped_artifacts()
        if art is None:
            from devtools.fakes import make_tiny_artifacts

            art = workdir / "artifacts"
            make_tiny_artifacts(art, slow_reps=cfg.slow_reps)
            self.s.artifacts = f"tiny random (slow_reps={cfg.slow_reps})"
        else:
            self.s.artifacts = "shipped artifacts/"
        self.art = art
        self.images, self.s.gallery = gallery(cfg.items, shipped=self.s.artifacts.startswith("shipped"))
        self.s.items = len(self.images)
        if stack is None:
            stack = Stack(create_database(), REDIS_URL, art, workdir)
        else:
            stack.artifacts_dir, stack.workdir = art, workdir
        if cfg.sweep_restart:  # the old model's vectors go as soon as the rollout completes
            stack.extra_env = {**stack.extra_env, "BACKFILL_OLD_EMBEDDING_RETENTION_DAYS": "0"}
        self.stack = stack
        flush_redis(stack.redis_url)
        self.pg: Postgres | DbProxy | None = None
        if cfg.pg_stop_seconds > 0 and cfg.db_outage == "proxy":
            self.pg = DbProxy(sa.make_url(stack.database_url).port or 5432)
            self.pg.start()
            stack.proc_database_url = self.pg.url(stack.database_url)
        elif cfg.pg_stop_seconds > 0:
            self.pg = Postgres(cfg.pg_cluster)
        self.s.db_outage = "none" if self.pg is None else cfg.db_outage
        self.apis = [Api("api-a", stack), Api("api-b", stack)]  # restarted one at a time: one always answers
        self.worker = Worker("worker", stack)
        self.searcher: Searcher | None = None
        self.writers = [
            Writer(f"w{i}", self.apis, cfg.write_batch, cfg.seed + 100 + i, cfg.write_interval)
            for i in range(cfg.writers)
        ]
        self.t_rollout = 0.0

    def start(self) -> list[str]:
        """Seed, start the processes and the searcher; the fixed queries compared across API restarts."""
        s, stack = self.s, self.stack
        log(f"seeding {s.items} items ({s.gallery}, {s.artifacts}) into {sa.make_url(stack.database_url).database}")
        seed(stack.database_url, self.art, self.images)
        for a in self.apis:
            a.start()
        self.worker.start()
        for a in self.apis:
            a.wait_ready()
        log(f"APIs ready on {[a.url for a in self.apis]}; worker pid {self.worker.p.pid if self.worker.p else '-'}")
        qimgs = self.images[self.rng.sample(range(len(self.images)), min(len(self.images), 200))]
        queries = [base64.b64encode(encode_png(im)).decode() for im in qimgs]
        self.searcher = Searcher(self.apis, queries, self.pg)
        self.searcher.start()
        return queries[: self.cfg.compare_queries]

    def upgrade(self) -> int:
        """POST /upgrade, throttled so the chaos fits inside the rollout; waits for its first progress."""
        rate = max(5.0, self.s.items / self.cfg.chaos_seconds)
        body = {
            "to": "v2",
            "mode": "reverse",
            "policy": "uncertainty",
            "batch_size": self.cfg.batch_size,
            "max_items_per_second": rate,
        }
        ro = op(self.apis, "POST", "/upgrade", body)
        rid = self.s.rollout_id = int(ro["id"])
        self.t_rollout = time.monotonic()
        assert self.searcher is not None
        self.searcher.rollout_id = rid
        log(f"rollout {rid} started, throttled to {rate:.0f} items/s; {len(self.writers)} writers")
        for w in self.writers:
            w.start()
        deadline = time.monotonic() + 120
        while rollout_view(self.apis[0].url, rid)["done"] == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no progress:\n{self.worker.tail()}")
            time.sleep(0.2)
        return rid

    def restart_worker(self, event: str) -> None:
        """The worker exited on its own: count it, say so, start it again."""
        self.s.worker_unexpected_exits += 1
        self.s.events.append(event)
        self.worker.start()

    def outage(self, view: dict[str, Any]) -> None:
        assert self.pg is not None
        cfg, s = self.cfg, self.s
        log(f"database outage ({cfg.db_outage}) for {cfg.pg_stop_seconds:.0f}s")
        t0 = time.monotonic()
        self.pg.stop()
        try:
            time.sleep(cfg.pg_stop_seconds)
        finally:
            self.pg.start_again()
        s.pg_down_seconds = round(time.monotonic() - t0, 1)
        s.events.append(f"database outage ({cfg.db_outage}) {s.pg_down_seconds}s at done={view.get('done')}")
        with_grace = time.monotonic() + 5  # connection pools notice the restart on their next use
        while time.monotonic() < with_grace:
            time.sleep(0.5)

    def apply(self, ev: str, rid: int, compare: list[str]) -> None:
        """One event of the schedule."""
        s, rng, worker = self.s, self.rng, self.worker
        if not worker.alive():  # it may have died of a fault (a flushed queue, a lost database)
            self.restart_worker(f"worker exited by itself (rc {worker.p.returncode if worker.p else '?'}); restarted")
        time.sleep(rng.uniform(0.5, 3.0))
        view = rollout_safe(self.apis, rid)
        if ev == "kill":
            worker.kill(signal.SIGKILL)
            s.worker_kills += 1
            s.events.append(f"SIGKILL worker at done={view.get('done')}")
            time.sleep(rng.uniform(0.0, 1.0))
            worker.start()
            await_progress(self.apis, rid, view.get("done"), worker)  # the next kill lands mid-work
        elif ev.startswith("api:"):
            api = self.apis[int(ev.split(":")[1]) % len(self.apis)]
            log(f"restarting {api.name}")
            for w in self.writers:  # the answers before and after are compared on a fixed gallery
                w.idle.clear()
                w.hold.set()
            for w in self.writers:
                w.idle.wait(timeout=60)
            try:
                restart_api(api, self.apis, rid, self.stack, compare, s)
            finally:
                for w in self.writers:
                    w.hold.clear()
        elif ev == "redis":
            flush_redis(self.stack.redis_url)
            s.redis_flushes += 1
            s.events.append(f"FLUSHDB redis at done={view.get('done')}")
        elif ev == "pg" and self.pg is not None:
            self.outage(view)
        log(s.events[-1])

    def complete(self, rid: int) -> None:
        """After the chaos: lift the throttle and wait for the rollout to end."""
        s = self.s
        view = rollout_safe(self.apis, rid)
        s.active_through_chaos = view.get("status") == "running"
        if not s.active_through_chaos:
            s.problems.append(f"the rollout was not running any more when the chaos ended ({view.get('status')})")
        log("chaos over; lifting the throttle and waiting for completion")
        if view.get("status") == "running":
            op(self.apis, "PATCH", f"/rollouts/{rid}", {"max_items_per_second": None})
        deadline = time.monotonic() + self.cfg.complete_timeout
        while True:
            if not self.worker.alive():
                self.restart_worker("worker exited by itself after the chaos; restarted")
            view = rollout_safe(self.apis, rid)
            if view.get("status") in ("completed", "aborted", "failed"):
                break
            if time.monotonic() > deadline:
                s.problems.append(f"rollout not finished after {self.cfg.complete_timeout}s: {view}")
                break
            time.sleep(0.5)
        s.rollout_status = str(view.get("status"))
        s.rollout_seconds = round(time.monotonic() - self.t_rollout, 1)
        self.stop_writers()
        time.sleep(1.0)  # a few searches on the completed layout

    def stop_writers(self) -> None:
        for w in self.writers:
            w.halt.set()
        for w in self.writers:
            w.join(timeout=30)

    def check_writes(self) -> None:
        """Every item a writer got a 200 for finds itself through /search on every API."""
        s = self.s
        accepted = {i: img for w in self.writers for i, img in w.accepted.items()}
        s.written_items = len(accepted)
        s.writes = dict(sum((w.statuses for w in self.writers), Counter()))
        if not accepted:
            return
        for a in self.apis:
            a.wait_ready()
        s.written_found = [found_by_self_query(a, accepted) for a in self.apis]
        if any(n != len(accepted) for n in s.written_found):
            s.problems.append(f"written items found by self-query {s.written_found} of {len(accepted)}")

    def restart_after_sweep(self) -> None:
        """The old model's vectors swept, an API restarted: every live item finds itself from its first 200."""
        s = self.s
        seen = sweep_then_restart(self.apis[0], self.stack.database_url, "v1")
        s.sweep_restart = seen
        s.events.append(f"sweep then restart {self.apis[0].name}: {seen}")
        log(s.events[-1])
        if seen["old_rows_left"] != 0:
            s.problems.append(f"the retention sweep left {seen['old_rows_left']} v1 rows")
        if seen["found"] != seen["live"]:
            s.problems.append(f"after the sweep and a restart {seen['found']} of {seen['live']} items found themselves")

    def stop(self) -> None:
        self.stop_writers()
        if self.searcher is not None:
            self.searcher.halt.set()
            self.searcher.join(timeout=30)
        if self.pg is not None:
            self.pg.ensure_up()
        for p in (self.worker, *self.apis):
            p.stop()

    def finish(self, keep_db: bool, out: Path | None) -> None:
        """The end checks, the logs under `out`, and the clean-up."""
        s, cfg, procs = self.s, self.cfg, (self.worker, *self.apis)
        verify(self.stack.database_url, s, self.searcher)
        if s.rollout_status != "completed":
            s.problems.append(f"rollout ended {s.rollout_status!r}")
        if s.worker_kills < cfg.kills:
            s.problems.append(f"only {s.worker_kills} worker kills")
        if not s.ok:
            for p in procs:
                log(f"--- {p.name} log tail ---\n{p.tail(15)}")
        if out is not None:
            (out / "logs").mkdir(parents=True, exist_ok=True)
            for p in procs:
                with contextlib.suppress(OSError):
                    (out / "logs" / p.log_path.name).write_bytes(p.log_path.read_bytes()[-200_000:])
        if isinstance(self.pg, DbProxy):
            self.pg.close()
        if self.own_db and not keep_db:
            drop_database(self.stack.database_url)
        flush_redis(self.stack.redis_url)
        self.tmp.cleanup()


def run(cfg: Config, stack: Stack | None = None, *, keep_db: bool = False, out: Path | None = None) -> Summary:
    """The chaos run. With `stack` given (tests), its database must be migrated and empty."""
    chaos = Chaos(cfg, stack)
    t_start = time.monotonic()
    try:
        compare = chaos.start()
        rid = chaos.upgrade()
        for ev in schedule(cfg, chaos.pg is not None):
            chaos.apply(ev, rid, compare)
        chaos.complete(rid)
        if chaos.s.rollout_status == "completed":
            chaos.check_writes()
            if cfg.sweep_restart:
                chaos.restart_after_sweep()
    finally:
        chaos.stop()
    chaos.finish(keep_db, out)
    s = chaos.s
    log(f"total {time.monotonic() - t_start:.0f}s")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({**asdict(s), "ok": s.ok, "config": asdict(cfg)}, indent=2))
    return s


__all__ = ["Chaos", "run", "schedule"]
