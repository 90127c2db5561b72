"""Processes for the shared-index tests: a milvus-lite server several processes reach by URI (`python -m
milvus_lite server`), and an index writer process (`python -m tests.integration.milvus_procs DB URI PREFIX`):
a follower on the shared collections that syncs every 50 ms until killed. With BACKFILL_MILVUS_FAULT set
(service/milvus_index.py) it kills itself at that point."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from service.config import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def milvus_lite_server(data_dir: Path) -> Iterator[str]:
    """A milvus-lite gRPC server in its own process; yields its URI."""
    from pymilvus import MilvusClient

    port = _free_port()
    args = ["server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "milvus-lite exited"
            try:
                MilvusClient(uri, timeout=2).close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield uri
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spawn_writer(db_url: str, uri: str, prefix: str, fault: str = "") -> subprocess.Popen[bytes]:
    env = {**os.environ, "BACKFILL_MILVUS_FAULT": fault}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.milvus_procs", db_url, uri, prefix],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _writer_main(db_url: str, uri: str, prefix: str) -> None:
    from service.config import Settings
    from service.db import make_engine, make_sessionmaker
    from service.index import IndexManager
    from service.ingest import Follower
    from service.milvus_index import SharedSpaces
    from tests.integration.test_ingest import to_new_space

    sm = make_sessionmaker(make_engine(Settings(database_url=db_url)))
    f = Follower(
        sm,
        IndexManager(),
        factory="Flat",
        use_gpu=False,
        batch_size=100,
        poll_seconds=0.05,
        forward=to_new_space,
        make_space=SharedSpaces(uri, prefix=prefix),
    )
    while True:
        f.sync_once()
        time.sleep(0.05)


if __name__ == "__main__":
    _writer_main(*sys.argv[1:4])
