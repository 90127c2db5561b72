"""The API and worker subprocesses of the chaos run, on one shared environment."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from devtools.chaos.env import REPO, TOKEN, free_port


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
        super().__init__(name, [sys.executable, "-m", "cli", "serve", "--port", str(self.port)], stack)

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
        super().__init__(name, [sys.executable, "-m", "cli", "worker", "--maintenance-seconds", "0.5"], stack)
