"""Schemathesis as an external client: a real `backfill serve` subprocess (Postgres + Redis, a seeded gallery,
the operator token and an API key configured) and the `st` CLI against it over HTTP, with every check and
every phase (examples, coverage, fuzzing, and stateful, which follows the links the OpenAPI document
declares between operations). 0 failures are required.

The hooks file (tests/integration/test_schemathesis_hooks.py) sends real PNGs where the schema asks for
base64 images and drops only the "schema-valid request rejected" failures whose 422 no JSON schema can
state (an unregistered upgrade target, bytes that are not a model, a cursor this API did not return); the
test prints how many it dropped, per rule. Deterministic seed; about 40-60 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.fakes import make_tiny_artifacts, seed_gallery
from service.config import REPO_ROOT, Settings
from service.db import make_engine, make_sessionmaker
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

TOKEN = "schemathesis-live-operator-token-0123456789"
API_KEY = "schemathesis-live-reader-key-0123456789"
HOOKS = Path(__file__).with_name("test_schemathesis_hooks.py")
SEED = 1
MAX_EXAMPLES = 60  # per operation and phase; the total is about 2,000 cases
MIN_CASES = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live_server(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """`backfill serve` on a free port over the test session's Postgres and Redis, 40 items, v1 serving."""
    artifacts = make_tiny_artifacts(tmp_path / "artifacts")
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as session:
        seed_gallery(session, artifacts, 40)
    engine.dispose()
    port = _free_port()
    env = {
        **os.environ,
        "BACKFILL_DATABASE_URL": str(settings.database_url),
        "BACKFILL_REDIS_URL": str(settings.redis_url),
        "BACKFILL_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "BACKFILL_DATA_DIR": str(tmp_path / "data"),
        "BACKFILL_OPERATOR_TOKEN": TOKEN,
        "BACKFILL_API_KEYS": json.dumps([API_KEY]),
        "BACKFILL_MAX_K": "50",
        "BACKFILL_MAX_BATCH_QUERIES": "16",
        "BACKFILL_INGEST_POLL_SECONDS": "0.1",
        "BACKFILL_LOG_LEVEL": "WARNING",
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:

            def ready() -> bool:
                assert proc.poll() is None, log_path.read_text()
                try:
                    return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(ready, timeout=60, interval=0.3, message=log_path.read_text)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    tail = log_path.read_text(errors="replace")[-4000:]
    assert "Traceback" not in tail, tail  # no unhandled error, even one that still answered


def _config(path: Path) -> Path:
    """Credentials per security scheme, so the auth checks can remove or corrupt each one on its own."""
    path.write_text(
        f'[auth.openapi.HTTPBearer]\nbearer = "{TOKEN}"\n\n[auth.openapi.ApiKey]\napi_key = "{API_KEY}"\n',
        encoding="utf-8",
    )
    return path


def test_schemathesis_over_http_all_checks_all_phases(live_server: str, tmp_path: Path) -> None:
    dropped_log = tmp_path / "dropped.txt"
    st = Path(sys.executable).with_name("st")
    cmd = [
        str(st),
        "--config-file",
        str(_config(tmp_path / "schemathesis.toml")),
        "run",
        f"{live_server}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--no-color",
        "--report",
        "json",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "ST_DROPPED_LOG": str(dropped_log)}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    reports = sorted((tmp_path / "report").glob("json-*.json"))
    assert reports, run.stdout[-6000:] + run.stderr[-3000:]
    report = json.loads(reports[-1].read_text())
    cases = report["test_cases"]
    dropped = Counter(dropped_log.read_text().splitlines()) if dropped_log.exists() else Counter()
    phases = ", ".join(f"{name}: {phase['status']}" for name, phase in report["phases"].items())
    print(
        f"\nschemathesis over HTTP: {cases['generated']} cases over {report['operations']['tested']} operations, "
        f"phases {phases}; "
        f"{cases['with_failures']} with failures, {len(report['failures'])} failures, {len(report['errors'])} errors, "
        f"{report['running_time']:.1f} s; semantic 422s dropped by the hooks: {sum(dropped.values())}"
    )
    for rule, n in sorted(dropped.items()):
        print(f"  {n:4d}  {rule}")
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-3000:]
    assert report["failures"] == [] and report["errors"] == [] and cases["with_failures"] == 0
    assert report["operations"]["tested"] == report["operations"]["total"] >= 19, report["operations"]
    assert report["phases"]["stateful"]["status"] == "success", report["phases"]
    assert report["phases"]["coverage"]["status"] == report["phases"]["fuzzing"]["status"] == "success"
    assert cases["generated"] >= MIN_CASES
