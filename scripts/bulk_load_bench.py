"""Bulk-load throughput: `backfill items add` on a folder of 10,000 Fashion-MNIST test PNGs, beside the same
images sent by direct `POST /items` calls (same batch size, one client, sequential), in one run.

Each side gets its own fresh Postgres database (created next to BACKFILL_BENCH_DATABASE_URL, default the local
test server, and dropped afterwards) and its own `backfill serve` on the embedded Redis, with the shipped v1
serving, so both measure the same work: decode, embed with v1, store, make searchable.

    .venv/bin/python scripts/bulk_load_bench.py [--items 10000] [--batch-size 256] [--order cli,direct]
                                                [--interrupt-after 8]
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devtools.scratch_db import create_database, drop_database, server_url  # noqa: E402
from models.data import load_fashion_mnist  # noqa: E402
from models.preprocess import encode_png  # noqa: E402

BACKFILL = str(Path(sys.executable).with_name("backfill"))
DB = os.environ.get("BACKFILL_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_pngs(folder: Path, n: int) -> list[Path]:
    images, labels = load_fashion_mnist(split="test")
    paths = []
    for i in range(n):
        p = folder / str(int(labels[i])) / f"{i:05d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(encode_png(images[i]))
        paths.append(p)
    return paths


class Server:
    """A fresh database and a `backfill serve` on it (embedded Redis in its own data dir)."""

    def __init__(self, work: Path, name: str) -> None:
        self.admin = server_url(DB)
        self.db = create_database(self.admin, "backfill_bench")
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
        self.env.update(
            BACKFILL_DATABASE_URL=self.db.render_as_string(hide_password=False),
            BACKFILL_DATA_DIR=str(work / name),
            BACKFILL_API_URL=f"http://127.0.0.1:{self.port}",
            BACKFILL_LOG_LEVEL="WARNING",
        )
        subprocess.run([BACKFILL, "db", "upgrade"], env=self.env, check=True, capture_output=True)
        self.proc = subprocess.Popen([BACKFILL, "serve", "--port", str(self.port)], env=self.env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("backfill serve did not become ready")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        drop_database(self.admin, self.db)


def total(port: int) -> int:
    return int(httpx.get(f"http://127.0.0.1:{port}/items", params={"limit": 1}, timeout=30).json()["total"])


def run_cli(work: Path, name: str, paths: list[Path], batch_size: int) -> tuple[int, float]:
    """`backfill items add` on the folder (a subprocess, as an operator runs it); (items stored, seconds)."""
    server = Server(work, name)
    try:
        t0 = time.perf_counter()
        cmd = [BACKFILL, "items", "add", str(work / "images"), "--labels-from-folders", "--batch-size", str(batch_size)]
        subprocess.run(cmd, env=server.env, check=True, stderr=subprocess.DEVNULL)
        return total(server.port), time.perf_counter() - t0
    finally:
        server.close()


def run_direct(work: Path, name: str, paths: list[Path], batch_size: int) -> tuple[int, float]:
    """The same files through POST /items from this process, one batch after the other."""
    server = Server(work, name)
    try:
        token = {"Authorization": "Bearer dev-operator-token"}
        t0 = time.perf_counter()
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", headers=token, timeout=120) as c:
            for start in range(0, len(paths), batch_size):
                items = [
                    {"id": p.name, "image_b64": base64.b64encode(p.read_bytes()).decode(), "label": int(p.parent.name)}
                    for p in paths[start : start + batch_size]
                ]
                c.post("/items", json={"items": items}).raise_for_status()
        return total(server.port), time.perf_counter() - t0
    finally:
        server.close()


def run_resume(work: Path, name: str, paths: list[Path], batch_size: int, after: float) -> None:
    """`backfill items add` interrupted by SIGINT (Ctrl-C) after `after` seconds, then run again: prints what
    was stored after each and checks that every file ended up in the gallery once."""
    server = Server(work, name)
    try:
        cmd = [BACKFILL, "items", "add", str(work / "images"), "--labels-from-folders", "--batch-size", str(batch_size)]
        proc = subprocess.Popen(cmd, env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        print(f"Ctrl-C after {after:g} s: exit {proc.returncode}; {err.strip().splitlines()[-1]}")
        print(f"  stored: {total(server.port)}")
        again = subprocess.run(cmd, env=server.env, capture_output=True, text=True, check=True)
        print(f"  run again: {again.stdout.strip()}")
        stored = total(server.port)
        print(f"  stored: {stored} of {len(paths)}")
        assert stored == len(paths)
    finally:
        server.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--order", default="direct,cli,cli,direct", help="Runs, in order (each on a fresh server).")
    ap.add_argument("--interrupt-after", type=float, default=0, help="Also: Ctrl-C after this many s, resume.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = write_pngs(work / "images", args.items)
        print(f"{len(paths)} PNGs written under {work / 'images'}")

        runs = {"cli": run_cli, "direct": run_direct}
        results: dict[str, list[tuple[int, float]]] = {"cli": [], "direct": []}
        for name in args.order.split(","):
            results[name].append(runs[name](work, f"{name}{len(results[name])}", paths, args.batch_size))
        if args.interrupt_after > 0:
            run_resume(work, "resume", paths, args.batch_size, args.interrupt_after)

    for name, label in (("cli", "backfill items add"), ("direct", "direct POST /items")):
        for n, seconds in results[name]:
            print(f"{label}: {n} items in {seconds:.1f} s = {n / seconds:.0f} items/s")


if __name__ == "__main__":
    main()
