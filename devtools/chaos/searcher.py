"""The searching client of the chaos run."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import httpx

from devtools.chaos.faults import DbProxy, Postgres
from devtools.chaos.procs import Api


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

    def _search(self, clients: list[httpx.Client], i: int, q: str) -> int:
        """One search, failing over to the next API on a transport error; its final status (0 = none)."""
        status = 0
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
        return status

    def run(self) -> None:
        rng = random.Random(1)
        clients = [httpx.Client(base_url=a.url, timeout=10) for a in self.apis]
        i = 0
        while not self.halt.is_set():
            q = rng.choice(self.queries)
            t0 = time.perf_counter()
            status = self._search(clients, i, q)
            i += 1
            self.latencies.append(time.perf_counter() - t0)
            self.records.append((time.monotonic(), status, bool(self.pg and self.pg.outage)))
            if self.rollout_id is not None and i % 10 == 0:
                self._read_rollout(clients[i % len(clients)])
            time.sleep(0.01)
        for c in clients:
            c.close()
