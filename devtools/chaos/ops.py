"""Operator calls of the chaos run, made through whichever API answers, and the API restart check."""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any

import httpx
import sqlalchemy as sa

from devtools.chaos.config import Summary
from devtools.chaos.env import AUTH
from devtools.chaos.procs import Api, Stack, Worker


def rollout_view(api_url: str, rid: int) -> dict[str, Any]:
    return httpx.get(f"{api_url}/rollouts/{rid}", timeout=10).raise_for_status().json()


def op(apis: list[Api], method: str, path: str, body: dict[str, Any] | None = None, tries: int = 60) -> dict[str, Any]:
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


def rollout_safe(apis: list[Api], rid: int) -> dict[str, Any]:
    for a in apis * 3:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            return rollout_view(a.url, rid)
        time.sleep(0.3)
    return {}


def await_progress(apis: list[Api], rid: int, done: Any, worker: Worker, timeout: float = 30.0) -> None:
    """Until the rollout's `done` moves past `done` (the restarted worker is working again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.alive():
        view = rollout_safe(apis, rid)
        if view.get("done", done) != done or view.get("status") not in (None, "running", "planning"):
            return
        time.sleep(0.2)


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
    op(apis, "POST", f"/rollouts/{rid}/pause")
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
    op(apis, "POST", f"/rollouts/{rid}/resume")
