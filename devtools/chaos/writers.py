"""Writers and the restart-after-sweep check of the chaos run.

`Writer` threads add new items through `POST /items` all through the rollout (failing over between APIs and
retrying through the database outage), as a production gallery keeps growing during an upgrade; at the end
every item they got a 200 for must be live, hold a target-model vector and find itself through `/search`.

`sweep_then_restart` runs after completion with a retention of 0 days: it waits until the worker's sweep has
deleted the old model's vectors, restarts an API and, from its first 200 on /readyz, asks every live item for
itself: all must be found (issue 13: after a sweep a restarted API found 620 of 1,000).
"""

from __future__ import annotations

import base64
import signal
import threading
import time
from collections import Counter
from typing import Any

import httpx
import numpy as np
import sqlalchemy as sa

from devtools.chaos.env import AUTH
from devtools.chaos.procs import Api
from models.preprocess import encode_png

SELF_QUERY_K = 10
BATCH_QUERIES = 100


class Writer(threading.Thread):
    """Posts `batch` new items (unique noise images) at a time until halted; records what was accepted."""

    def __init__(self, name: str, apis: list[Api], batch: int, seed: int, interval: float = 0.2) -> None:
        super().__init__(name=name, daemon=True)
        self.apis, self.batch, self.interval = apis, batch, interval
        self.rng = np.random.default_rng(seed)
        self.halt = threading.Event()
        self.hold = threading.Event()  # set: stop writing (an API restart compares answers on a fixed gallery)
        self.idle = threading.Event()  # set by the thread while it holds, with no request in flight
        self.accepted: dict[str, str] = {}  # id -> base64 PNG, for every id a 200 named
        self.statuses: Counter[str] = Counter()  # "200", "503", "no API", other codes
        self.n = 0

    def _next_batch(self) -> list[dict[str, Any]]:
        out = []
        for _ in range(self.batch):
            self.n += 1
            img = self.rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
            out.append({"id": f"{self.name}-{self.n}", "image_b64": base64.b64encode(encode_png(img)).decode()})
        return out

    def _post(self, c: httpx.Client, items: list[dict[str, Any]]) -> bool:
        r = c.post("/items", json={"items": items}, headers=AUTH)
        self.statuses[str(r.status_code)] += 1
        if r.status_code != 200:
            return False
        body = r.json()
        named = set(body["created"]) | set(body["existing"]) | set(body["revived"])
        self.accepted.update({it["id"]: it["image_b64"] for it in items if it["id"] in named})
        return True

    def run(self) -> None:
        clients = [httpx.Client(base_url=a.url, timeout=20) for a in self.apis]
        items, i = self._next_batch(), 0
        while not self.halt.is_set():
            if self.hold.is_set():
                self.idle.set()
                time.sleep(0.05)
                continue
            self.idle.clear()
            c = clients[i % len(clients)]
            i += 1
            try:
                if self._post(c, items):  # a refused batch (503 in the outage) is sent again as it was
                    items = self._next_batch()
            except httpx.HTTPError:
                self.statuses["no API"] += 1  # that API is restarting: the next one is tried
            time.sleep(self.interval)
        for c in clients:
            c.close()


def found_by_self_query(api: Api, items: dict[str, str]) -> int:
    """How many of `items` (id -> base64 image) are among the top SELF_QUERY_K of their own image."""
    found, ids = 0, list(items)
    with httpx.Client(base_url=api.url, timeout=60) as c:
        for start in range(0, len(ids), BATCH_QUERIES):
            chunk = ids[start : start + BATCH_QUERIES]
            body = {"queries": [{"image_b64": items[i]} for i in chunk], "k": SELF_QUERY_K}
            r = c.post("/search/batch", json=body)
            r.raise_for_status()
            found += sum(i in {h["id"] for h in row} for i, row in zip(chunk, r.json()["results"], strict=True))
    return found


def live_items(database_url: str) -> dict[str, str]:
    """Every live item of the database: external id -> its stored image, base64."""
    eng = sa.create_engine(database_url)
    try:
        with eng.connect() as c:
            sql = sa.text("SELECT external_id, payload FROM items WHERE deleted_at IS NULL")
            rows: list[Any] = list(c.execute(sql))
    finally:
        eng.dispose()
    return {str(i): base64.b64encode(bytes(p)).decode() for i, p in rows}


def _rows_of(database_url: str, model: str) -> int:
    eng = sa.create_engine(database_url)
    try:
        with eng.connect() as c:
            sql = sa.text("SELECT count(*) FROM embeddings WHERE model_version = :m")
            return int(c.execute(sql, {"m": model}).scalar_one())
    finally:
        eng.dispose()


def sweep_then_restart(api: Api, database_url: str, old_model: str, timeout: float = 60.0) -> dict[str, Any]:
    """Wait for the retention sweep to delete `old_model`'s vectors, restart `api`, and self-query every live
    item from its first 200 on /readyz. Returns what was seen."""
    t0, left = time.monotonic(), -1
    while time.monotonic() - t0 < timeout:
        left = _rows_of(database_url, old_model)
        if left == 0:
            break
        time.sleep(0.2)
    swept_after = round(time.monotonic() - t0, 1)
    items = live_items(database_url)
    api.kill(signal.SIGTERM)
    t_restart = time.monotonic()
    api.start()
    api.wait_ready()  # polls /readyz every 0.2 s: the self-queries start at its first 200
    ready_s = round(time.monotonic() - t_restart, 1)
    found = found_by_self_query(api, items)
    return {"old_rows_left": left, "swept_after_s": swept_after, "ready_s": ready_s, "live": len(items), "found": found}
