"""The compose stack's api and worker, run as processes with docker-compose.yml's commands and environment
(database/Redis URLs rewritten to the test servers, loopback ports), scraped by a real Prometheus server with
deploy/prometheus/prometheus.yml's scrape jobs pointed at them. A small rollout runs under query load, then every
PromQL expression of the Grafana dashboard must return data through Prometheus's HTTP API.

Needs the `prometheus` binary (Debian package `prometheus`; `make test` installs it): skipped when it is absent,
except in CI where that is an error.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import gzip
import math
import os
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from models.preprocess import encode_png
from tests.helpers import wait_until
from tests.unit.test_deploy import (
    COMPOSE_SECRETS,
    PROMETHEUS_FILE,
    backfill_executable,
    dashboard_expressions,
    load_compose,
    service_command,
    service_environment,
    to_promql,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"
TOKEN = "deploy-stack-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_ITEMS = 48
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
START_TIMEOUT = 60.0
ROLLOUT_TIMEOUT = 60.0
DATA_TIMEOUT = 25.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _prometheus_binary() -> str:
    exe = shutil.which("prometheus")
    if exe is None:
        msg = "the `prometheus` binary is not installed (apt-get install -y prometheus; `make test` does it)"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return exe


def _images(n: int) -> list[bytes]:
    """PNG bytes of n Fashion-MNIST test images (random 28x28 images when the dataset is absent)."""
    if FASHION_MNIST.is_file():
        with gzip.open(FASHION_MNIST, "rb") as f:
            raw = f.read(16 + n * 28 * 28)
        arr = np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, 28, 28)
    else:
        arr = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return [encode_png(a) for a in arr]


def _artifacts_dir(tmp_path: Path) -> Path:
    """The shipped artifacts when they are there, else tiny random ones (same layout and names)."""
    shipped = REPO / "artifacts"
    if all((shipped / d / "manifest.json").is_file() for d in ("v1", "v2", "compat-v1-v2")):
        return shipped
    from devtools.fakes import make_tiny_artifacts

    out = tmp_path / "artifacts"
    make_tiny_artifacts(out)
    return out


class Proc:
    """A child process in its own process group (uvicorn forks workers), logging to a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.log = log_dir / f"{name}.log"
        self._fh = self.log.open("wb")
        self.p = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout=10)
        self._fh.close()


def _child_env(compose_env: dict[str, str], overrides: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    return {**base, **compose_env, **overrides}


def _rewrite_api_command(cmd: list[str], port: int) -> list[str]:
    out = list(cmd)
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        assert flag in out, f"the compose api command has no {flag}: {cmd}"
        out[out.index(flag) + 1] = value
    return out


def render_prometheus_config(targets: dict[str, str], interval: str = "1s") -> dict[str, Any]:
    """The repo's scrape jobs (same names, paths and relabelling) with each job's discovery replaced by one
    static loopback target."""
    cfg: dict[str, Any] = copy.deepcopy(yaml.safe_load(PROMETHEUS_FILE.read_text()))
    cfg["global"] = {**cfg.get("global", {}), "scrape_interval": interval, "scrape_timeout": interval}
    jobs = []
    for job in cfg["scrape_configs"]:
        name = job["job_name"]
        if name not in targets:
            pytest.fail(f"scrape job {name!r} of {PROMETHEUS_FILE} has no loopback target in this test")
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        job["static_configs"] = [{"targets": [targets[name]]}]
        jobs.append(job)
    cfg["scrape_configs"] = jobs
    return cfg


def _wait_http(url: str, procs: list[Proc], timeout: float, ok: tuple[int, ...] = (200,)) -> None:
    last = [""]

    def up() -> bool:
        for p in procs:
            if not p.alive():
                pytest.fail(f"{p.name} exited ({p.p.returncode}) while waiting for {url}:\n{p.tail()}")
        try:
            r = httpx.get(url, timeout=2.0)
        except httpx.HTTPError as e:
            last[0] = repr(e)
            return False
        last[0] = f"{r.status_code} {r.text[:300]}"
        return r.status_code in ok

    def report() -> str:
        logs = "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in procs)
        return f"{url} not ready (last: {last[0]})\n{logs}"

    wait_until(up, timeout=timeout, interval=0.3, message=report)


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5.0)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {r.status_code} {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def _target_health(prom: str) -> dict[str, tuple[str, str]]:
    targets = httpx.get(f"{prom}/api/v1/targets", timeout=5.0).json()["data"]["activeTargets"]
    return {t["labels"]["job"]: (t["health"], t.get("lastError", "")) for t in targets}


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()


def test_dashboard_queries_return_data_for_a_live_rollout(
    pg: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    prometheus = _prometheus_binary()
    services = load_compose({**COMPOSE_SECRETS, "BACKFILL_OPERATOR_TOKEN": TOKEN})["services"]
    api_port, worker_metrics_port, prom_port = _free_port(), _free_port(), _free_port()
    multiproc = tmp_path / "prometheus-multiproc"
    multiproc.mkdir()
    overrides = {
        "BACKFILL_DATABASE_URL": pg,
        "BACKFILL_REDIS_URL": redis_url,
        "BACKFILL_ARTIFACTS_DIR": str(_artifacts_dir(tmp_path)),
        "BACKFILL_DATA_DIR": str(tmp_path / "data"),
        "BACKFILL_QUEUE_NAME": f"deploy-test-{uuid.uuid4().hex[:8]}",  # never share jobs with other tests
        "BACKFILL_USE_GPU": "false",
        # the live probe measures every second so its panels have data; this test is not about the guard
        "BACKFILL_PROBE_INTERVAL_SECONDS": "1",
        "BACKFILL_GUARD_MARGIN": "1",
    }
    exe = backfill_executable()

    api_env = service_environment(services["api"])
    assert "PROMETHEUS_MULTIPROC_DIR" in api_env
    api_cmd = _rewrite_api_command(service_command(services["api"]), api_port)
    api = Proc(
        "api",
        [exe, *api_cmd[1:]],
        _child_env(api_env, {**overrides, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}),
        tmp_path,
    )
    procs.append(api)
    worker_env = service_environment(services["worker"])
    worker = Proc(
        "worker",
        [exe, *service_command(services["worker"])[1:]],
        _child_env(worker_env, {**overrides, "BACKFILL_METRICS_PORT": str(worker_metrics_port)}),
        tmp_path,
    )
    procs.append(worker)

    cfg_path = tmp_path / "prometheus.yml"
    cfg_path.write_text(
        yaml.safe_dump(
            render_prometheus_config(
                {
                    "api": f"127.0.0.1:{api_port}",
                    "worker": f"127.0.0.1:{worker_metrics_port}",
                    "prometheus": f"127.0.0.1:{prom_port}",
                }
            )
        )
    )
    prom_proc = Proc(
        "prometheus",
        [
            prometheus,
            f"--config.file={cfg_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        tmp_path,
    )
    procs.append(prom_proc)
    prom = f"http://127.0.0.1:{prom_port}"
    base = f"http://127.0.0.1:{api_port}"

    _wait_http(f"{prom}/-/ready", [prom_proc], 20)
    _wait_http(f"{base}/healthz", [api], START_TIMEOUT)
    _wait_http(f"http://127.0.0.1:{worker_metrics_port}/metrics", [worker], START_TIMEOUT)
    _wait_http(f"{base}/readyz", [api, worker], START_TIMEOUT)

    images = [base64.b64encode(b).decode() for b in _images(N_ITEMS)]
    stop_search = threading.Event()
    search_errors: list[str] = []

    with httpx.Client(base_url=base, timeout=30.0) as client:
        r = client.post(
            "/items",
            headers=AUTH,
            json={"items": [{"id": f"img-{i}", "image_b64": b, "label": i % 3} for i, b in enumerate(images)]},
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["created"]) == N_ITEMS

        def search_loop() -> None:
            with httpx.Client(base_url=base, timeout=30.0) as c:
                i = 0
                while not stop_search.is_set():
                    resp = c.post("/search", json={"image_b64": images[i % N_ITEMS], "k": 5})
                    if resp.status_code != 200:
                        search_errors.append(f"{resp.status_code} {resp.text[:200]}")
                    i += 1
                    stop_search.wait(0.1)

        searcher = threading.Thread(target=search_loop, name="search-load", daemon=True)
        searcher.start()
        try:
            # Small batches and a throttle, so the rollout spans several scrapes.
            r = client.post("/upgrade", headers=AUTH, json={"to": "v2", "batch_size": 8, "max_items_per_second": 8})
            assert r.status_code == 202, r.text
            rollout_id = r.json()["id"]
            ro: dict[str, Any] = {}

            def finished() -> bool:
                ro.update(client.get(f"/rollouts/{rollout_id}").json())  # also refreshes the rollout gauges
                if not worker.alive():
                    pytest.fail(f"worker exited: {ro}\n--- worker ---\n{worker.tail()}")
                return ro["status"] in ("completed", "aborted", "failed")

            wait_until(
                finished,
                timeout=ROLLOUT_TIMEOUT,
                interval=0.5,
                message=lambda: f"rollout did not complete: {ro}\n--- worker ---\n{worker.tail()}",
            )
            assert ro["status"] == "completed", ro
            assert ro["done"] == N_ITEMS, ro

            # Every dashboard expression must come back with at least one finite sample.
            exprs = {e: to_promql(e) for e in dashboard_expressions()}
            missing: dict[str, str] = {}

            def all_have_data() -> bool:
                client.get(f"/rollouts/{rollout_id}")
                missing.clear()
                for expr, promql in exprs.items():
                    result = _query(prom, promql)
                    if not _has_finite_value(result):
                        missing[expr] = str(result)[:200]
                return not missing

            def no_data() -> str:
                return (
                    "dashboard expressions without data:\n"
                    + "\n".join(f"  {e}  ->  {v}" for e, v in missing.items())
                    + f"\ntargets: {_target_health(prom)}"
                )

            wait_until(all_have_data, timeout=DATA_TIMEOUT, interval=1.0, message=no_data)
        finally:
            stop_search.set()
            searcher.join(timeout=10)

    health = _target_health(prom)
    assert all(h == "up" for h, _ in health.values()), health
    assert not search_errors, search_errors[:5]
