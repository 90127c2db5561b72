"""Process hygiene of `backfill serve` on the embedded defaults (SQLite + embedded Redis): the embedded Redis
lives under BACKFILL_DATA_DIR and no process it started outlives it, whether it is stopped by SIGTERM or
killed by SIGKILL; a SIGTERM during start-up stops it at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.fakes import make_tiny_artifacts
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

BACKFILL = str(Path(sys.executable).with_name("backfill"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc's children lists)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            for k in kids:
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
    art = tmp_path / "artifacts"
    if not art.exists():
        make_tiny_artifacts(art)
    return {**env, "BACKFILL_DATA_DIR": str(tmp_path / "data"), "BACKFILL_ARTIFACTS_DIR": str(art), **extra}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    proc = subprocess.Popen(
        [BACKFILL, "serve", "--port", str(port)],
        env=env_for(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_nothing_serve_started_outlives_it(
    serve: tuple[subprocess.Popen[bytes], int], tmp_path: Path, sig: signal.Signals
) -> None:
    proc, port = serve

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=90, interval=0.5, message="backfill serve never became ready")
    children = descendants(proc.pid)
    assert children, "the embedded redis-server should be a child of backfill serve"
    assert (tmp_path / "data" / "redis.sock").exists()  # under BACKFILL_DATA_DIR, not /tmp
    proc.send_signal(sig)
    proc.wait(30)
    wait_until(
        lambda: not any(alive(p) for p in children),
        timeout=15,
        interval=0.1,
        message=lambda: f"still running: {[p for p in children if alive(p)]}",
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_start_up_stops_serve_at_once(tmp_path: Path, workers: int) -> None:
    """A database that accepts the connection and never answers keeps the lifespan waiting: SIGTERM still
    stops the process (it used to be noted and ignored until start-up ended)."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)  # never accepted: the client's handshake waits forever
    url = f"postgresql+psycopg://u@127.0.0.1:{hole.getsockname()[1]}/db"
    proc = subprocess.Popen(
        [BACKFILL, "serve", "--port", str(free_port()), "--workers", str(workers)],
        env=env_for(tmp_path, BACKFILL_DATABASE_URL=url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        # every uvicorn process is in its lifespan: it logs this line when the lifespan starts
        wait_until(
            lambda: sum("Waiting for application startup" in line for line in lines) >= workers,
            timeout=180,
            interval=0.2,
            message=lambda: "".join(lines)[-2000:],
        )
        time.sleep(1)
        assert proc.poll() is None, "".join(lines)
        children = descendants(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert time.monotonic() - t0 < 10
        reader.join(10)
        assert "during start-up: stopping now" in "".join(lines)
        wait_until(lambda: not any(alive(p) for p in children), timeout=15, interval=0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        hole.close()
