"""Chaos run on real Postgres and Redis: a rollout survives worker SIGKILLs, API restarts, a Redis FLUSHDB
and a Postgres outage, while a client searches all along.

Set-up: a fresh database on the Postgres server, a gallery (Fashion-MNIST test images with the shipped
artifacts/{v1,v2,compat-v1-v2}; tiny random artifacts + sklearn digits otherwise), two API processes
(`backfill serve`, restarted one at a time, so a client that fails over between them always has one) and
one worker process (`python -m worker`). Then `POST /upgrade` (throttled so the chaos fits inside it) and,
during the rollout: SIGKILL the worker at random moments (restarted each time), restart each API once
(with the rollout paused, a fixed query set is answered identically before and after the restart), FLUSHDB
the Redis database, and stop Postgres for >= 10 s (`pg_ctlcluster stop|start`). A thread searches
continuously and counts statuses.

Asserted at the end: the rollout completes; the target model's embeddings are exactly the live items (no
loss, no duplicates); no task is pending or leased; every search got a 2xx, or a 503 only while Postgres
was down (counted separately); the before/after-restart answers are equal. Prints a summary table and
writes runs/chaos/summary.json.

    .venv/bin/python scripts/chaos.py [--items 3000] [--kills 12] [--no-pg-stop] [--keep-db]

Postgres is stopped with `pg_ctlcluster --skip-systemctl-redirect 15 main stop` (override the version and
cluster with --pg-cluster "15 main"); it is always started again, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from models.preprocess import encode_png  # noqa: E402

TOKEN = "chaos-operator-token-9c41e07d2b55"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PG_ADMIN_URL = os.environ.get("BACKFILL_CHAOS_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BACKFILL_CHAOS_REDIS_URL", "redis://127.0.0.1:6379/14")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- environment --------------------------------------------------------------------------------------


def shipped_artifacts() -> Path | None:
    art = REPO / "artifacts"
    if all((art / d / "manifest.json").exists() for d in ("v1", "v2", "compat-v1-v2")):
        return art
    return None


def gallery(n: int, shipped: bool) -> tuple[np.ndarray, str]:
    """(n, 28, 28) uint8 images and where they come from."""
    if shipped:
        from models.data import load_fashion_mnist

        imgs, _ = load_fashion_mnist(split="test")
        return imgs[:n].astype(np.uint8), f"Fashion-MNIST test[:{n}]"
    from worker.testing import gallery_images

    return gallery_images(n), f"sklearn digits x{n}"


def create_database(admin_url: str = PG_ADMIN_URL) -> str:
    name = f"backfill_chaos_{uuid.uuid4().hex[:8]}"
    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text("SELECT 1"))
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')  # a generated identifier, never user input
    eng.dispose()
    url = sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    from service.config import Settings
    from service.db.migrate import upgrade_head

    upgrade_head(Settings(database_url=url))
    return url


def drop_database(url: str, admin_url: str = PG_ADMIN_URL) -> None:
    name = sa.make_url(url).database
    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    eng.dispose()


def seed(database_url: str, artifacts_dir: Path, images: np.ndarray) -> None:
    """Register v1 (serving) + v2 + compat and insert the gallery with v1 embeddings, straight into the DB."""
    from service.config import Settings
    from service.db import make_engine, make_sessionmaker
    from worker.testing import seed_gallery

    paths = {"v1": artifacts_dir / "v1", "v2": artifacts_dir / "v2", "compat": artifacts_dir / "compat-v1-v2"}
    engine = make_engine(Settings(database_url=database_url))
    with make_sessionmaker(engine)() as s:
        seed_gallery(s, paths, len(images), images=images)
    engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """Environment shared by the API and worker subprocesses."""

    database_url: str
    redis_url: str
    artifacts_dir: Path
    workdir: Path
    lease_seconds: float = 3.0
    extra_env: dict[str, str] = field(default_factory=dict)
    proc_database_url: str | None = None  # what the subprocesses use (a DbProxy in front), default database_url

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BACKFILL_DATABASE_URL": self.proc_database_url or self.database_url,
            "BACKFILL_REDIS_URL": self.redis_url,
            "BACKFILL_ARTIFACTS_DIR": str(self.artifacts_dir),
            "BACKFILL_DATA_DIR": str(self.workdir / "data"),
            "BACKFILL_OPERATOR_TOKEN": TOKEN,
            "BACKFILL_LEASE_SECONDS": str(self.lease_seconds),
            "BACKFILL_MAX_ATTEMPTS": "50",  # a task may be in flight at many of the kills
            "BACKFILL_METRICS_PORT": "0",
            "BACKFILL_INGEST_POLL_SECONDS": "0.2",
            "BACKFILL_USE_GPU": "false",
            "BACKFILL_LOG_LEVEL": "WARNING",
            "OMP_NUM_THREADS": "1",
            **self.extra_env,
        }


class Proc:
    """A subprocess with its output in a log file."""

    def __init__(self, name: str, argv: list[str], stack: Stack) -> None:
        self.name, self.argv, self.stack = name, argv, stack
        self.p: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.stack.workdir / f"{self.name}.log"

    def start(self) -> None:
        self.starts += 1
        with self.log_path.open("ab") as f:
            f.write(f"\n=== start {self.starts} ===\n".encode())
            self.p = subprocess.Popen(
                self.argv, cwd=REPO, env=self.stack.env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Api(Proc):
    def __init__(self, name: str, stack: Stack, port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__(name, [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)], stack)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def new_side(self) -> int:
        r = httpx.get(f"{self.url}/readyz", timeout=5).json()
        return int(r.get("serving", {}).get("new", -1))


class Worker(Proc):
    def __init__(self, name: str, stack: Stack) -> None:
        super().__init__(name, [sys.executable, "-m", "worker", "--maintenance-seconds", "0.5"], stack)


# --- Postgres and Redis faults ------------------------------------------------------------------------


class Postgres:
    GRACE_SECONDS = 3.0  # after `start` returns, pools reconnect on their next use

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster.split()
        self.down = False
        self.up_at = 0.0

    @property
    def outage(self) -> bool:
        """Down, or started again less than GRACE_SECONDS ago."""
        return self.down or time.monotonic() - self.up_at < self.GRACE_SECONDS

    def _ctl(self, action: str) -> None:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", *self.cluster, action], check=True, capture_output=True
        )

    def stop(self) -> None:
        self.down = True
        self._ctl("stop")

    def start(self) -> None:
        self._ctl("start")
        self.down = False
        self.up_at = time.monotonic()

    start_again = start

    def ensure_up(self) -> None:
        if self.down:
            self.start()
        st = subprocess.run(["pg_ctlcluster", *self.cluster, "status"], capture_output=True)
        if st.returncode != 0:
            self._ctl("start")


class DbProxy(threading.Thread):
    """A TCP proxy in front of Postgres for the API and worker processes: `cut()` drops every connection and
    refuses new ones (what an outage looks like to a client) without touching the shared server; `restore()`
    lets them through again. The CI-safe stand-in for stopping Postgres."""

    def __init__(self, target_port: int = 5432) -> None:
        super().__init__(name="db-proxy", daemon=True)
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.open = threading.Event()
        self.open.set()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.down = False
        self.up_at = 0.0

    @property
    def outage(self) -> bool:
        return self.down or time.monotonic() - self.up_at < Postgres.GRACE_SECONDS

    def url(self, database_url: str) -> str:
        return sa.make_url(database_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def run(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for x in (src, dst):
                with contextlib.suppress(OSError):
                    x.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:  # the `Postgres` interface: an outage starts
        self.down = True
        self.open.clear()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
                c.close()

    def start_again(self) -> None:
        self.open.set()
        self.down = False
        self.up_at = time.monotonic()

    def ensure_up(self) -> None:
        self.start_again()

    def close(self) -> None:
        self.sock.close()


def flush_redis(url: str) -> None:
    r = redis.Redis.from_url(url)
    r.flushdb()
    r.close()


# --- the searching client -----------------------------------------------------------------------------


class Searcher(threading.Thread):
    """Searches continuously, failing over between API processes on a refused connection (as a load
    balancer would); records every final status with the time it was received."""

    def __init__(self, apis: list[Api], queries: list[str], pg: Postgres | DbProxy | None) -> None:
        super().__init__(name="searcher", daemon=True)
        self.apis, self.queries, self.pg = apis, queries, pg
        self.halt = threading.Event()
        self.records: list[tuple[float, int, bool]] = []  # (time, status or 0 = no API answered, pg down)
        self.failovers = 0
        self.latencies: list[float] = []
        self.errors: list[str] = []  # the first non-2xx answers, for the report
        self.rollout_id: int | None = None  # once set, every 10th round also reads GET /rollouts/{id} (DB-backed)
        self.reads: Counter[str] = Counter()  # "2xx" | "503 pg outage" | other statuses

    def _read_rollout(self, c: httpx.Client) -> None:
        try:
            status = c.get(f"/rollouts/{self.rollout_id}").status_code
        except httpx.HTTPError:
            return  # that API is restarting; the search path above covers failover
        pg = bool(self.pg and self.pg.outage)
        key = "2xx" if 200 <= status < 300 else "503 pg outage" if status == 503 and pg else str(status)
        self.reads[key] += 1

    def run(self) -> None:
        rng = random.Random(1)
        clients = [httpx.Client(base_url=a.url, timeout=10) for a in self.apis]
        i = 0
        while not self.halt.is_set():
            q = rng.choice(self.queries)
            status = 0
            t0 = time.perf_counter()
            for attempt in range(len(clients) * 3):
                c = clients[(i + attempt) % len(clients)]
                try:
                    r = c.post("/search", json={"image_b64": q, "k": 10})
                    status = r.status_code
                    if status >= 300 and len(self.errors) < 20:
                        self.errors.append(f"{time.strftime('%H:%M:%S')} {c.base_url} {status} {r.text[:200]}")
                    break
                except httpx.HTTPError:
                    self.failovers += 1
                    time.sleep(0.05)
            i += 1
            self.latencies.append(time.perf_counter() - t0)
            self.records.append((time.monotonic(), status, bool(self.pg and self.pg.outage)))
            if self.rollout_id is not None and i % 10 == 0:
                self._read_rollout(clients[i % len(clients)])
            time.sleep(0.01)
        for c in clients:
            c.close()


# --- the run ------------------------------------------------------------------------------------------


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
    events: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _rollout(api_url: str, rid: int) -> dict[str, Any]:
    return httpx.get(f"{api_url}/rollouts/{rid}", timeout=10).raise_for_status().json()


def _op(apis: list[Api], method: str, path: str, body: dict[str, Any] | None = None, tries: int = 60) -> dict[str, Any]:
    """An operator call to whichever API answers (retried through restarts and outages)."""
    last: Any = None
    for i in range(tries):
        api = apis[i % len(apis)]
        try:
            r = httpx.request(method, f"{api.url}{path}", json=body, headers=AUTH, timeout=15)
            if r.status_code < 500:
                if r.status_code >= 400:
                    raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
                return dict(r.json())
            last = r.text
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.5)
    raise RuntimeError(f"{method} {path} failed: {last}")


def _v2_count(database_url: str) -> int:
    eng = sa.create_engine(database_url)
    try:
        with eng.connect() as c:
            return int(c.execute(sa.text("SELECT count(*) FROM embeddings WHERE model_version = 'v2'")).scalar_one())
    finally:
        eng.dispose()


def _quiesce(api: Api, database_url: str, timeout: float = 60.0) -> int:
    """With the rollout paused: wait until the v2 embedding count is stable and `api` has ingested all of it."""
    deadline = time.monotonic() + timeout
    prev, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = _v2_count(database_url)
        if n != prev:
            prev, stable_since = n, time.monotonic()
        elif time.monotonic() - stable_since > 1.5 and api.new_side() == n:
            return n
        time.sleep(0.2)
    raise TimeoutError(f"{api.name} did not settle (v2 rows {prev}, its NEW side {api.new_side()})")


def _answers(api: Api, queries: list[str]) -> list[list[tuple[str, float, str]]]:
    out = []
    with httpx.Client(base_url=api.url, timeout=15) as c:
        for q in queries:
            r = c.post("/search", json={"image_b64": q, "k": 10})
            r.raise_for_status()
            out.append([(h["id"], round(h["distance"], 5), h["source"]) for h in r.json()["results"]])
    return out


def restart_api(api: Api, apis: list[Api], rid: int, stack: Stack, queries: list[str], s: Summary) -> None:
    """Pause, settle, answer the fixed queries, restart the API process, answer again, resume."""
    _op(apis, "POST", f"/rollouts/{rid}/pause")
    n = _quiesce(api, stack.database_url)
    before = _answers(api, queries)
    api.kill(signal.SIGTERM)
    api.start()
    api.wait_ready()
    _quiesce(api, stack.database_url)
    after = _answers(api, queries)
    equal = before == after
    s.restart_results_equal.append(equal)
    s.api_restarts += 1
    s.events.append(f"restart {api.name} (paused at {n} v2 rows): results equal = {equal}")
    if not equal:
        diff = sum(1 for a, b in zip(before, after, strict=True) if a != b)
        s.problems.append(f"{api.name}: {diff}/{len(queries)} queries answered differently after the restart")
    _op(apis, "POST", f"/rollouts/{rid}/resume")


def run(cfg: Config, stack: Stack | None = None, *, keep_db: bool = False, out: Path | None = None) -> Summary:
    """The chaos run. With `stack` given (tests), its database must be migrated and empty."""
    rng = random.Random(cfg.seed)
    s = Summary()
    own_db = stack is None
    tmp = tempfile.TemporaryDirectory(prefix="backfill-chaos-")
    workdir = Path(tmp.name)
    art = None if cfg.tiny else shipped_artifacts()
    if art is None:
        from worker.testing import make_tiny_artifacts

        art = workdir / "artifacts"
        make_tiny_artifacts(art, slow_reps=cfg.slow_reps)
        s.artifacts = f"tiny random (slow_reps={cfg.slow_reps})"
    else:
        s.artifacts = "shipped artifacts/"
    images, s.gallery = gallery(cfg.items, shipped=s.artifacts.startswith("shipped"))
    s.items = len(images)
    if stack is None:
        stack = Stack(create_database(), REDIS_URL, art, workdir)
    else:
        stack.artifacts_dir, stack.workdir = art, workdir
    flush_redis(stack.redis_url)
    pg: Postgres | DbProxy | None = None
    if cfg.pg_stop_seconds > 0 and cfg.db_outage == "proxy":
        pg = DbProxy(sa.make_url(stack.database_url).port or 5432)
        pg.start()
        stack.proc_database_url = pg.url(stack.database_url)
    elif cfg.pg_stop_seconds > 0:
        pg = Postgres(cfg.pg_cluster)
    s.db_outage = "none" if pg is None else cfg.db_outage
    apis = [Api("api-a", stack), Api("api-b", stack)]  # restarted one at a time: one always answers
    worker = Worker("worker", stack)
    searcher: Searcher | None = None
    t_start = time.monotonic()
    try:
        log(f"seeding {s.items} items ({s.gallery}, {s.artifacts}) into {sa.make_url(stack.database_url).database}")
        seed(stack.database_url, art, images)
        for a in apis:
            a.start()
        worker.start()
        for a in apis:
            a.wait_ready()
        log(f"APIs ready on {[a.url for a in apis]}; worker pid {worker.p.pid if worker.p else '-'}")
        qimgs = images[rng.sample(range(len(images)), min(len(images), 200))]
        queries = [base64.b64encode(encode_png(im)).decode() for im in qimgs]
        compare = queries[: cfg.compare_queries]
        searcher = Searcher(apis, queries, pg)
        searcher.start()

        rate = max(5.0, s.items / cfg.chaos_seconds)
        ro = _op(
            apis,
            "POST",
            "/upgrade",
            {"to": "v2", "policy": "uncertainty", "batch_size": cfg.batch_size, "max_items_per_second": rate},
        )
        rid = s.rollout_id = int(ro["id"])
        searcher.rollout_id = rid
        t_rollout = time.monotonic()
        log(f"rollout {rid} started, throttled to {rate:.0f} items/s")
        deadline = time.monotonic() + 120
        while _rollout(apis[0].url, rid)["done"] == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no progress:\n{worker.tail()}")
            time.sleep(0.2)

        # The chaos schedule: kills spread around the other events.
        events: list[str] = ["kill"] * cfg.kills
        specials = [f"api:{i}" for i in range(cfg.api_restarts)]
        if cfg.redis_flush:
            specials.append("redis")
        if pg is not None:
            specials.append("pg")
        for k, ev in enumerate(specials):
            events.insert(min(len(events), (k + 1) * len(events) // (len(specials) + 1) + k), ev)
        for ev in events:
            if not worker.alive():  # it may have died of a fault (a flushed queue, a lost database)
                s.worker_unexpected_exits += 1
                s.events.append(f"worker exited by itself (rc {worker.p.returncode if worker.p else '?'}); restarted")
                worker.start()
            time.sleep(rng.uniform(0.5, 3.0))
            view = _rollout_safe(apis, rid)
            if ev == "kill":
                worker.kill(signal.SIGKILL)
                s.worker_kills += 1
                s.events.append(f"SIGKILL worker at done={view.get('done')}")
                time.sleep(rng.uniform(0.0, 1.0))
                worker.start()
                _await_progress(apis, rid, view.get("done"), worker)  # the next kill lands mid-work
            elif ev.startswith("api:"):
                api = apis[int(ev.split(":")[1]) % len(apis)]
                log(f"restarting {api.name}")
                restart_api(api, apis, rid, stack, compare, s)
            elif ev == "redis":
                flush_redis(stack.redis_url)
                s.redis_flushes += 1
                s.events.append(f"FLUSHDB redis at done={view.get('done')}")
            elif ev == "pg" and pg is not None:
                log(f"database outage ({cfg.db_outage}) for {cfg.pg_stop_seconds:.0f}s")
                t0 = time.monotonic()
                pg.stop()
                try:
                    time.sleep(cfg.pg_stop_seconds)
                finally:
                    pg.start_again()
                s.pg_down_seconds = round(time.monotonic() - t0, 1)
                s.events.append(f"database outage ({cfg.db_outage}) {s.pg_down_seconds}s at done={view.get('done')}")
                with_grace = time.monotonic() + 5  # connection pools notice the restart on their next use
                while time.monotonic() < with_grace:
                    time.sleep(0.5)
            log(s.events[-1])

        view = _rollout_safe(apis, rid)
        s.active_through_chaos = view.get("status") == "running"
        if not s.active_through_chaos:
            s.problems.append(f"the rollout was not running any more when the chaos ended ({view.get('status')})")
        log("chaos over; lifting the throttle and waiting for completion")
        if view.get("status") == "running":
            _op(apis, "PATCH", f"/rollouts/{rid}", {"max_items_per_second": None})
        deadline = time.monotonic() + cfg.complete_timeout
        while True:
            if not worker.alive():
                s.worker_unexpected_exits += 1
                s.events.append("worker exited by itself after the chaos; restarted")
                worker.start()
            view = _rollout_safe(apis, rid)
            if view.get("status") in ("completed", "aborted", "failed"):
                break
            if time.monotonic() > deadline:
                s.problems.append(f"rollout not finished after {cfg.complete_timeout}s: {view}")
                break
            time.sleep(0.5)
        s.rollout_status = str(view.get("status"))
        s.rollout_seconds = round(time.monotonic() - t_rollout, 1)
        time.sleep(1.0)  # a few searches on the completed layout
    finally:
        if searcher is not None:
            searcher.halt.set()
            searcher.join(timeout=30)
        if pg is not None:
            pg.ensure_up()
        for p in (worker, *apis):
            p.stop()

    _verify(stack.database_url, s, searcher)
    if s.rollout_status != "completed":
        s.problems.append(f"rollout ended {s.rollout_status!r}")
    if s.worker_kills < cfg.kills:
        s.problems.append(f"only {s.worker_kills} worker kills")
    if not s.ok:
        for p in (worker, *apis):
            log(f"--- {p.name} log tail ---\n{p.tail(15)}")
    if out is not None:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        for p in (worker, *apis):
            with contextlib.suppress(OSError):
                (out / "logs" / p.log_path.name).write_bytes(p.log_path.read_bytes()[-200_000:])
    if isinstance(pg, DbProxy):
        pg.close()
    if own_db and not keep_db:
        drop_database(stack.database_url)
    flush_redis(stack.redis_url)
    tmp.cleanup()
    log(f"total {time.monotonic() - t_start:.0f}s")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({**asdict(s), "ok": s.ok, "config": asdict(cfg)}, indent=2))
    return s


def _await_progress(apis: list[Api], rid: int, done: Any, worker: Worker, timeout: float = 30.0) -> None:
    """Until the rollout's `done` moves past `done` (the restarted worker is working again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.alive():
        view = _rollout_safe(apis, rid)
        if view.get("done", done) != done or view.get("status") not in (None, "running", "planning"):
            return
        time.sleep(0.2)


def _rollout_safe(apis: list[Api], rid: int) -> dict[str, Any]:
    for a in apis * 3:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            return _rollout(a.url, rid)
        time.sleep(0.3)
    return {}


def _verify(database_url: str, s: Summary, searcher: Searcher | None) -> None:
    eng = sa.create_engine(database_url)
    with eng.connect() as c:
        s.live_items = int(c.execute(sa.text("SELECT count(*) FROM items WHERE deleted_at IS NULL")).scalar_one())
        s.v2_rows, s.v2_distinct_items = (
            int(x)
            for x in c.execute(
                sa.text("SELECT count(*), count(DISTINCT item_id) FROM embeddings WHERE model_version = 'v2'")
            ).one()
        )
        missing_or_extra = int(
            c.execute(
                sa.text(
                    "SELECT count(*) FROM (SELECT id FROM items WHERE deleted_at IS NULL "
                    "EXCEPT SELECT item_id FROM embeddings WHERE model_version = 'v2') a"
                )
            ).scalar_one()
        ) + int(
            c.execute(
                sa.text(
                    "SELECT count(*) FROM (SELECT item_id FROM embeddings WHERE model_version = 'v2' "
                    "EXCEPT SELECT id FROM items WHERE deleted_at IS NULL) b"
                )
            ).scalar_one()
        )
        if s.rollout_id is not None:
            rows = c.execute(
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
    if searcher is not None:
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
        *([("first errors", " // ".join(s.search_errors[:5]))] if s.search_errors else []),
        ("result", "OK" if s.ok else "FAILED: " + "; ".join(s.problems)),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{w}} | {v} |" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--keep-db", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "chaos")
    a = p.parse_args(argv)
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
    )
    s = run(cfg, keep_db=a.keep_db, out=a.out)
    print(table(s))
    print(f"wrote {a.out / 'summary.json'}")
    return 0 if s.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
