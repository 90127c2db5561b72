"""The checks of `make deploy-test` against a running compose stack (scripts/deploy-test.sh starts it).

Through the api's published port and Prometheus's: wait for /readyz and for Prometheus to scrape the api and
every worker replica; load a small gallery through POST /items; check that every item finds itself with a
self-query; upgrade v1 -> v2 to completion under a light search load; check every item again; check that every
expression of the Grafana dashboard returns data; save the dashboard's range data and render it into a PNG.
Grafana itself is not started (no image here): devtools/dashboard.py draws its panels from the same queries.

    python -m devtools.deploy_check --api http://127.0.0.1:8000 --prometheus http://127.0.0.1:9090 --workers 2

Exit status 0 when every check passed; 1 with the failed check on stderr.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from devtools import dashboard as dash
from service.config import REPO_ROOT


class CheckFailed(AssertionError):
    pass


def say(msg: str) -> None:
    print(f"[deploy-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """Poll `predicate` until it returns something truthy; CheckFailed after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as e:
            last_error = f" (last error: {e!r})"[:400]
        time.sleep(interval)
    raise CheckFailed(f"{what}: not reached in {timeout:g} s{last_error}")


def gallery_images(n: int) -> tuple[list[str], list[int]]:
    """n Fashion-MNIST test images as base64 PNG with their labels (random images when the set is absent)."""
    from models.data import DatasetMissing, load_fashion_mnist
    from models.preprocess import encode_png

    try:
        images, labels = load_fashion_mnist(split="test")
        images, labels = images[:n], labels[:n]
        say(f"gallery: the first {n} Fashion-MNIST test images")
    except DatasetMissing:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n)
        say(f"gallery: {n} random images (Fashion-MNIST is not installed)")
    return [base64.b64encode(encode_png(img)).decode() for img in images], [int(v) for v in labels]


class Stack:
    """The api and Prometheus of the running stack, as an outside client sees them."""

    def __init__(self, api: str, prom: str, token: str) -> None:
        self.http = httpx.Client(base_url=api, timeout=60.0)
        self.prom = prom
        self.auth = {"Authorization": f"Bearer {token}"}

    def post(self, path: str, body: dict[str, Any], ok: int = 200) -> dict[str, Any]:
        r = self.http.post(path, json=body, headers=self.auth)
        if r.status_code != ok:
            raise CheckFailed(f"POST {path}: {r.status_code} {r.text[:500]}")
        out: dict[str, Any] = r.json()
        return out

    def targets(self) -> dict[str, list[str]]:
        """Scrape targets that are up, by job."""
        body = httpx.get(f"{self.prom}/api/v1/targets", timeout=5.0).json()
        up: dict[str, list[str]] = {}
        for t in body["data"]["activeTargets"]:
            if t["health"] == "up":
                up.setdefault(t["labels"]["job"], []).append(t["labels"]["instance"])
        return up

    def not_found(self, ids: list[str], payloads: list[str], k: int = 10) -> list[str]:
        """The items whose self-query (POST /search/batch) does not return them in the top k."""
        missing = []
        for i in range(0, len(ids), 200):
            queries = [{"image_b64": p} for p in payloads[i : i + 200]]
            r = self.http.post("/search/batch", json={"queries": queries, "k": k})
            if r.status_code != 200:
                raise CheckFailed(f"POST /search/batch: {r.status_code} {r.text[:300]}")
            for item, hits in zip(ids[i : i + 200], r.json()["results"], strict=True):
                if item not in {h["id"] for h in hits}:
                    missing.append(item)
        return missing


class SearchLoad:
    """A light /search load in a thread, so that the query-path panels have data; records non-200 answers."""

    def __init__(self, stack: Stack, payloads: list[str], per_second: float = 4.0) -> None:
        self.stack, self.payloads, self.pause = stack, payloads, 1.0 / per_second
        self.stop_event, self.errors, self.count = threading.Event(), list[str](), 0
        self.thread = threading.Thread(target=self._run, name="search-load", daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=str(self.stack.http.base_url), timeout=30.0) as c:
            while not self.stop_event.is_set():
                try:
                    r = c.post("/search", json={"image_b64": self.payloads[self.count % len(self.payloads)], "k": 10})
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))
                self.count += 1
                self.stop_event.wait(self.pause)

    def __enter__(self) -> SearchLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)


def check_scrapes(stack: Stack, workers: int, timeout: float) -> dict[str, list[str]]:
    def all_up() -> dict[str, list[str]] | None:
        up = stack.targets()
        return up if len(up.get("api", [])) == 1 and len(set(up.get("worker", []))) == workers else None

    up: dict[str, list[str]] = wait_for(f"Prometheus scrapes the api and {workers} workers", all_up, timeout)
    say(f"Prometheus scrapes: api {up['api']}, workers {sorted(up['worker'])}")
    return up


def load_gallery(stack: Stack, ids: list[str], payloads: list[str], labels: list[int]) -> None:
    for i in range(0, len(ids), 100):
        items = [{"id": ids[j], "image_b64": payloads[j], "label": labels[j]} for j in range(i, min(i + 100, len(ids)))]
        created = stack.post("/items", {"items": items})
        if len(created.get("created", [])) != len(items):
            raise CheckFailed(f"POST /items created {len(created.get('created', []))} of {len(items)}: {created}")


def run_rollout(stack: Stack, batch_size: int, rate: float, timeout: float) -> dict[str, Any]:
    body = {"to": "v2", "batch_size": batch_size, "max_items_per_second": rate}
    started = stack.post("/upgrade", body, ok=202)
    rid = started["id"]
    say(f"rollout {rid} v1 -> v2 started (batch {batch_size}, at most {rate:g} items/s)")
    state: dict[str, Any] = {}

    def finished() -> bool:
        state.update(stack.http.get(f"/rollouts/{rid}").json())
        return state["status"] in ("completed", "aborted", "failed")

    wait_for(f"rollout {rid} finishes", finished, timeout, interval=1.0)
    if state["status"] != "completed":
        raise CheckFailed(f"rollout {rid} ended {state['status']}: {state}")
    return state


def check_dashboard(stack: Stack, rollout_id: int, since: float, timeout: float) -> int:
    """Every dashboard expression (Grafana's variables replaced) has returned at least one finite sample since
    `since`: a range query each, so a rate window that closed after the rollout still counts."""
    exprs = {e: dash.to_promql(e) for e in dash.dashboard_expressions()}
    missing: dict[str, str] = {}

    def all_have_data() -> bool:
        stack.http.get(f"/rollouts/{rollout_id}")  # the rollout gauges are refreshed by a read
        missing.clear()
        for expr, promql in exprs.items():
            result = dash.query_range(stack.prom, promql, since, time.time(), 2.0)
            if not any(dash.has_finite_point(s) for s in result):
                missing[expr] = str(result)[:160]
        return not missing

    try:
        wait_for("every dashboard expression returns data", all_have_data, timeout, interval=2.0)
    except CheckFailed as e:
        raise CheckFailed(f"{e}; without data:\n" + "\n".join(f"  {k} -> {v}" for k, v in missing.items())) from e
    return len(exprs)


def items_per_worker(stack: Stack) -> dict[str, float]:
    result = dash.query(stack.prom, 'sum by (instance) (backfill_worker_items_total{job="worker"})')
    return {s["metric"].get("instance", "?"): float(s["value"][1]) for s in result}


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    stack = Stack(args.api, args.prometheus, args.token)
    wait_for("the api answers /readyz 200", lambda: stack.http.get("/readyz").status_code == 200, args.start_timeout)
    say("api ready")
    scrapes = check_scrapes(stack, args.workers, args.start_timeout)
    payloads, labels = gallery_images(args.items)
    ids = [f"deploy-{i}" for i in range(args.items)]
    load_gallery(stack, ids, payloads, labels)
    wait_for(f"all {args.items} items searchable on v1", lambda: not stack.not_found(ids, payloads), 60, 1.0)
    say(f"{args.items} items loaded, each found by its own query (v1)")
    with SearchLoad(stack, payloads) as load:
        state = run_rollout(stack, args.batch_size, args.rate, args.rollout_timeout)
        say(f"rollout completed: {state['done']}/{state['total']} done, {state['failed']} failed")
        if state["done"] != args.items or state["failed"]:
            raise CheckFailed(f"rollout done {state['done']} of {args.items}, failed {state['failed']}")
        n_exprs = check_dashboard(stack, state["id"], t0, args.data_timeout)
        say(f"all {n_exprs} dashboard expressions return data")
        time.sleep(args.settle)  # a few more scrapes, so that the rendered panels end on the finished state
    if load.errors:
        raise CheckFailed(f"{len(load.errors)} of {load.count} searches during the rollout failed: {load.errors[:3]}")
    wait_for("every item searchable on v2", lambda: not stack.not_found(ids, payloads), 30, 1.0)
    serving = stack.http.get("/readyz").json().get("serving", {})
    if serving.get("model") != "v2":
        raise CheckFailed(f"after the rollout the api serves {serving}, not v2")
    say(f"every one of the {args.items} items found by its own query on v2")
    per_worker = items_per_worker(stack)
    t1 = time.time()
    data = dash.fetch(stack.prom, t0, t1, step=args.step)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dashboard.json").write_text(json.dumps(data))
    png = dash.render(data, out / "dashboard.png", args.title)
    say(f"dashboard rendered: {png}")
    return {
        "items": args.items,
        "searches_during_rollout": load.count,
        "items_per_worker": per_worker,
        "scrape_targets": scrapes,
        "dashboard_expressions": n_exprs,
        "seconds": round(t1 - t0, 1),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devtools.deploy_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--api", default="http://127.0.0.1:8000")
    p.add_argument("--prometheus", default="http://127.0.0.1:9090")
    p.add_argument("--token", default=os.environ.get("BACKFILL_OPERATOR_TOKEN", ""))
    p.add_argument("--workers", type=int, default=2, help="worker replicas Prometheus must scrape")
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rate", type=float, default=6.0, help="the rollout's max_items_per_second")
    p.add_argument("--step", type=float, default=5.0, help="range-query step of the rendered data (s)")
    p.add_argument("--start-timeout", type=float, default=240.0)
    p.add_argument("--rollout-timeout", type=float, default=600.0)
    p.add_argument("--data-timeout", type=float, default=90.0)
    p.add_argument("--out", default=str(REPO_ROOT / "runs" / "deploy"))
    p.add_argument("--settle", type=float, default=10.0, help="seconds of scrapes after the checks, for the render")
    p.add_argument("--title", default="")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if len(args.token) < 16:
        print("deploy-check: set BACKFILL_OPERATOR_TOKEN (or --token)", file=sys.stderr)
        return 2
    try:
        summary = run(args)
    except CheckFailed as e:
        print(f"deploy-check FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(summary, indent=1), flush=True)
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
