"""Load test of POST /search during an active backfill (real Postgres + Redis, one API, one worker).

Set-up as in the chaos run (devtools/chaos/): a fresh database, the gallery (the 10,000 Fashion-MNIST test
images with the shipped artifacts; tiny random artifacts + sklearn digits when artifacts/ lacks them, which the
output says),
`backfill serve` with the Flat index and `backfill worker`, then `POST /upgrade` to v2 (throttled by default
so that the backfill stays active for the whole measurement; --unthrottled lets it run flat out).

Load: open loop at --rate requests/s for --duration seconds (asyncio + httpx, one connection pool), each
request a random gallery image, k=10. A latency is measured from the request's *scheduled* start, so a
stalled server cannot hide queueing (no coordinated omission). Reported: achieved requests/s, p50/p95/p99/
max, errors (non-2xx or transport errors), and the backfill progress over the window. Target: 0 errors and
p99 <= 100 ms. Writes runs/load/summary.json.

    .venv/bin/python scripts/loadtest.py [--items 10000] [--rate 50] [--duration 60] [--unthrottled]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import platform
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from devtools import chaos
from models.preprocess import encode_png


async def load(url: str, queries: list[str], rate: float, duration: float, k: int) -> dict[str, Any]:
    lat: list[float] = []
    statuses: Counter[str] = Counter()
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:

        async def one(scheduled: float, q: str) -> None:
            try:
                r = await client.post("/search", json={"image_b64": q, "k": k})
                statuses[str(r.status_code)] += 1
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1
            lat.append(time.perf_counter() - scheduled)

        t0 = time.perf_counter()
        tasks = []
        n = int(rate * duration)
        for i in range(n):
            scheduled = t0 + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled, rng.choice(queries))))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    a = np.array(lat) * 1000
    ok = sum(v for s, v in statuses.items() if s.startswith("2"))
    return {
        "requests": len(lat),
        "seconds": round(elapsed, 1),
        "rps": round(len(lat) / elapsed, 1),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p95_ms": round(float(np.percentile(a, 95)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "max_ms": round(float(a.max()), 1),
        "errors": len(lat) - ok,
        "statuses": dict(statuses),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=50.0, help="offered requests per second (open loop)")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--unthrottled", action="store_true", help="let the backfill run as fast as it can")
    p.add_argument("--tiny", action="store_true", help="tiny random artifacts + digits even if artifacts/ exists")
    p.add_argument("--out", type=Path, default=chaos.REPO / "runs" / "load")
    return p


def _artifacts(tiny: bool, work: Path) -> tuple[Path, str]:
    """The shipped artifacts, or tiny random ones under `work`; and which."""
    art = None if tiny else chaos.shipped_artifacts()
    if art is None:
        from devtools.fakes import make_tiny_artifacts

        art = work / "artifacts"
        make_tiny_artifacts(art, slow_reps=10)
        return art, "tiny random (shipped artifacts/ missing or --tiny)"
    return art, "shipped artifacts/"


def _measure(a: argparse.Namespace, api: chaos.Api, worker: chaos.Worker, images: np.ndarray) -> dict[str, Any]:
    """Start a (throttled) rollout, wait for its progress, then the load; the figures."""
    rng = np.random.default_rng(1)
    queries = [base64.b64encode(encode_png(images[i])).decode() for i in rng.choice(len(images), 500, replace=False)]
    throttle = None if a.unthrottled else round(len(images) / (a.duration + 40), 1)
    body: dict[str, Any] = {"to": "v2", "policy": "uncertainty", "batch_size": a.batch_size}
    if throttle:
        body["max_items_per_second"] = throttle
    ro = httpx.post(f"{api.url}/upgrade", json=body, headers=chaos.AUTH, timeout=30).raise_for_status().json()
    rid = ro["id"]
    deadline = time.monotonic() + 120
    while httpx.get(f"{api.url}/rollouts/{rid}", timeout=10).json()["done"] == 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"backfill made no progress:\n{worker.tail()}")
        time.sleep(0.5)
    before = httpx.get(f"{api.url}/rollouts/{rid}", timeout=10).json()
    chaos.log(
        f"backfill running ({before['done']}/{before['total']}, throttle {throttle or 'off'}); "
        f"load {a.rate:.0f} req/s for {a.duration:.0f}s"
    )
    stats = asyncio.run(load(api.url, queries, a.rate, a.duration, a.k))
    after = httpx.get(f"{api.url}/rollouts/{rid}", timeout=10).json()
    return {
        "offered_rps": a.rate,
        "k": a.k,
        "backfill_throttle_items_per_s": throttle,
        "backfill_done_before": before["done"],
        "backfill_done_after": after["done"],
        "backfill_total": after["total"],
        "backfill_status_after": after["status"],
        "backfill_active_throughout": after["status"] in ("running", "planning") and after["done"] > before["done"],
        **stats,
    }


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="backfill-load-")
    work = Path(tmp.name)
    art, artifacts = _artifacts(a.tiny, work)
    images, source = chaos.gallery(a.items, shipped=artifacts.startswith("shipped"))
    db = chaos.create_database()
    stack = chaos.Stack(
        db,
        chaos.REDIS_URL,
        art,
        work,
        lease_seconds=30.0,
        extra_env={"BACKFILL_INDEX_FACTORY": "Flat", "BACKFILL_LOG_LEVEL": "WARNING"},
    )
    chaos.flush_redis(stack.redis_url)
    api = chaos.Api("api", stack)
    worker = chaos.Worker("worker", stack)
    result: dict[str, Any] = {}
    try:
        chaos.log(f"seeding {len(images)} items ({source}; {artifacts})")
        chaos.seed(db, art, images)
        api.start()
        worker.start()
        api.wait_ready(180)
        figures = _measure(a, api, worker, images)
        result = {
            "gallery": f"{len(images)} ({source})",
            "artifacts": artifacts,
            "index": "Flat",
            "cpus": __import__("os").cpu_count(),
            "machine": platform.machine(),
            **figures,
        }
        result["target_met"] = result["errors"] == 0 and result["p99_ms"] <= 100.0
    finally:
        worker.stop()
        api.stop()
        chaos.drop_database(db)
        chaos.flush_redis(stack.redis_url)
        tmp.cleanup()
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"| {k:<{width}} | {v} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "summary.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out / 'summary.json'}")
    return 0 if result.get("target_met") else 1


if __name__ == "__main__":
    raise SystemExit(main())
