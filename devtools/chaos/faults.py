"""Database outages for the chaos run: stopping the Postgres server, or cutting a TCP proxy in front of it."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time

import sqlalchemy as sa


class Postgres:
    GRACE_SECONDS = 3.0  # after `start` returns, pools reconnect on their next use

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster.split()
        self.down = False
        self.up_at = 0.0

    @property
    def outage(self) -> bool:
        """Down, or started again less than GRACE_SECONDS ago."""
        return self.down or time.monotonic() - self.up_at < self.GRACE_SECONDS

    def _ctl(self, action: str) -> None:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", *self.cluster, action], check=True, capture_output=True
        )

    def stop(self) -> None:
        self.down = True
        self._ctl("stop")

    def start(self) -> None:
        self._ctl("start")
        self.down = False
        self.up_at = time.monotonic()

    start_again = start

    def ensure_up(self) -> None:
        if self.down:
            self.start()
        st = subprocess.run(["pg_ctlcluster", *self.cluster, "status"], capture_output=True)
        if st.returncode != 0:
            self._ctl("start")


class DbProxy(threading.Thread):
    """A TCP proxy in front of Postgres for the API and worker processes: `cut()` drops every connection and
    refuses new ones (what an outage looks like to a client) without touching the shared server; `restore()`
    lets them through again. The CI-safe stand-in for stopping Postgres."""

    def __init__(self, target_port: int = 5432) -> None:
        super().__init__(name="db-proxy", daemon=True)
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.open = threading.Event()
        self.open.set()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.down = False
        self.up_at = 0.0

    @property
    def outage(self) -> bool:
        return self.down or time.monotonic() - self.up_at < Postgres.GRACE_SECONDS

    def url(self, database_url: str) -> str:
        return sa.make_url(database_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def run(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for x in (src, dst):
                with contextlib.suppress(OSError):
                    x.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:  # the `Postgres` interface: an outage starts
        self.down = True
        self.open.clear()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
                c.close()

    def start_again(self) -> None:
        self.open.set()
        self.down = False
        self.up_at = time.monotonic()

    def ensure_up(self) -> None:
        self.start_again()

    def close(self) -> None:
        self.sock.close()
