"""Section 3, under concurrency: ``POST /search`` throughput and latency at 1, 8 and 32 concurrent clients,
with and without micro-batching (``BACKFILL_SEARCH_BATCHING``), against the same live server in one run.

The server is the live service of section 3 (in this process, under uvicorn); batching is switched between
windows by swapping the app's settings. The load comes from a separate process (``python -m
devtools.bench.concurrency HOST PORT REQUESTS_FILE``, commands on stdin, one JSON line back per window) so
that the client does not share the server's GIL: each client is one keep-alive connection in a closed loop
(send, read the whole response, send the next), written on raw asyncio streams to keep the client's own CPU
small on a 2-core machine. A window counts the requests completed inside it after a warm-up; windows
alternate batched / unbatched (the order flips every time) so that drift and the other load on the machine
hit both alike; figures pool the repeats.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from devtools.bench.config import BenchConfig

LEVELS = (1, 8, 32)
THROUGHPUT_TARGET, TAIL_TARGET = 2.0, 2.0  # at 32 clients: batched >= 2x unbatched q/s; batched p99 <= 2x p50


# ------------------------------------------------------------------------------ the load client (own process)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError("response without content-length")


async def _client(
    host: str, port: int, reqs: list[bytes], window: tuple[float, float], out: dict[str, Any], seed: int
) -> None:
    """One keep-alive connection, closed loop, until the window ends."""
    start, end = window
    rng = random.Random(seed)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (t0 := time.perf_counter()) < end:
            writer.write(reqs[rng.randrange(len(reqs))])
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(_content_length(head))
            t1 = time.perf_counter()
            if start <= t1 <= end:
                out["lat"].append(t1 - t0)
                if not head.startswith(b"HTTP/1.1 200"):
                    out["errors"] += 1
    finally:
        writer.close()


async def _window(host: str, port: int, reqs: list[bytes], clients: int, seconds: float, warmup: float) -> dict:
    now = time.perf_counter()
    window = (now + warmup, now + warmup + seconds)
    out: dict[str, Any] = {"lat": [], "errors": 0}
    await asyncio.gather(*(_client(host, port, reqs, window, out, seed) for seed in range(clients)))
    return {"lat_ms": [x * 1000 for x in out["lat"]], "errors": out["errors"], "seconds": seconds}


def client_main(argv: list[str]) -> None:
    """`HOST PORT REQUESTS_FILE`; stdin: one {"clients", "seconds", "warmup"} per line -> one result line."""
    host, port, path = argv[0], int(argv[1]), Path(argv[2])
    reqs = [r.encode("latin-1") for r in json.loads(path.read_text())]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    for line in sys.stdin:
        cmd = json.loads(line)
        res = asyncio.run(_window(host, port, reqs, cmd["clients"], cmd["seconds"], cmd["warmup"]))
        print(json.dumps(res), flush=True)


# ------------------------------------------------------------------------------ the section (bench process)


def _requests(live: Any, n: int, k: int, seed: int = 11) -> list[str]:
    from models.preprocess import encode_png

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(live.images), size=min(n, len(live.images)), replace=False)
    host = urlsplit(live.base_url).netloc
    out = []
    for i in pick:
        body = json.dumps({"image_b64": base64.b64encode(encode_png(live.images[i])).decode(), "k": k})
        head = f"POST /search HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        out.append(f"{head}Content-Length: {len(body)}\r\n\r\n{body}")
    return out


def _set_batching(app: Any, on: bool) -> None:
    app.state.settings = app.state.settings.model_copy(update={"search_batching": on})


def _batch_counts(app: Any) -> tuple[Any, int, int]:
    b = getattr(app.state, "search_batcher", None)
    return (b, b.batches, b.requests) if b is not None else (None, 0, 0)


def _summary(lat: list[float], errors: int, seconds: float, batches: int, requests: int) -> dict[str, Any]:
    a = np.asarray(lat)
    p50, p99 = (float(np.percentile(a, q)) if a.size else float("nan") for q in (50, 99))
    return {
        "requests": int(a.size),
        "seconds": seconds,
        "qps": a.size / seconds if seconds else 0.0,
        "p50_ms": p50,
        "p99_ms": p99,
        "p99_over_p50": p99 / p50 if p50 else None,
        "errors": errors,
        "mean_batch": requests / batches if batches else None,
    }


def _measure(proc: subprocess.Popen[str], app: Any, reps: int, seconds: float) -> dict[tuple[int, bool], dict]:
    """Every (clients, batching) window `reps` times, the batched/unbatched order flipping each time."""
    acc: dict[tuple[int, bool], dict[str, Any]] = {
        (c, on): {"lat": [], "errors": 0, "seconds": 0.0, "batches": 0, "requests": 0}
        for c in LEVELS
        for on in (False, True)
    }
    flip = False
    for _ in range(reps):
        for c in LEVELS:
            for on in (True, False) if flip else (False, True):
                _set_batching(app, on)
                b0 = _batch_counts(app)
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps({"clients": c, "seconds": seconds, "warmup": 0.5}) + "\n")
                proc.stdin.flush()
                res = json.loads(proc.stdout.readline())
                b1 = _batch_counts(app)
                a = acc[(c, on)]
                a["lat"] += res["lat_ms"]
                a["errors"] += res["errors"]
                a["seconds"] += res["seconds"]
                if b1[0] is b0[0]:  # the same batcher throughout the window
                    a["batches"] += b1[1] - b0[1]
                    a["requests"] += b1[2] - b0[2]
            flip = not flip
    return {key: _summary(a["lat"], a["errors"], a["seconds"], a["batches"], a["requests"]) for key, a in acc.items()}


def section_concurrency(cfg: BenchConfig, live: Any) -> dict[str, Any]:
    app = live.app
    settings0 = app.state.settings
    reps, seconds = cfg.q(3, 1), float(cfg.q(3, 1))
    url = urlsplit(live.base_url)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requests.json"
        path.write_text(json.dumps(_requests(live, 500, cfg.k)))
        cmd = [sys.executable, "-m", "devtools.bench.concurrency", str(url.hostname), str(url.port), str(path)]
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            res = _measure(proc, app, reps, seconds)
        finally:
            app.state.settings = settings0
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(30)
    rows = []
    for c in LEVELS:
        off, on = res[(c, False)], res[(c, True)]
        rows.append({"clients": c, "unbatched": off, "batched": on, "qps_ratio": on["qps"] / off["qps"]})
    return {
        "levels": list(LEVELS),
        "repeats": reps,
        "window_s": seconds,
        "k": cfg.k,
        "max_batch": settings0.search_batch_max,
        "max_wait_ms": settings0.search_batch_wait_ms,
        "load_average_before": [round(x, 2) for x in load0],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "measure_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }


if __name__ == "__main__":
    client_main(sys.argv[1:])
