"""The deployment files agree with the code: docker-compose.yml (structure, commands that exist in the CLI,
settings that exist), the Prometheus scrape config, the Grafana provisioning and dashboard (metric names that
service/metrics.py defines, the provisioned datasource uid), the Dockerfile and .dockerignore.

No Docker engine is needed: `docker compose config` is used when the compose plugin is installed, and the
file is always checked structurally with PyYAML (after a compose-style `${VAR}` interpolation) as well.
The helpers here are shared with tests/integration/test_deploy_stack.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

from service import metrics as metrics_module
from service.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_FILE = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "backfill.json"
DATASOURCE_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_FILE = GRAFANA_DIR / "provisioning" / "dashboards" / "backfill.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

TEST_TOKEN = "compose-test-operator-token-0123456789"
APP_SERVICES = ("migrate", "api", "worker")
EXPECTED_SERVICES = {"postgres", "redis", "migrate", "api", "worker", "prometheus", "grafana"}

# Grafana's global variables, replaced by what Prometheus's HTTP API accepts.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


# --- helpers (also used by the integration test) -------------------------------------------------------
class InterpolationError(ValueError):
    pass


_VAR = re.compile(
    r"\$(?:\$"  # $$
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"  # ${VAR...}
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"  # $VAR
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose-style interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err},
    ${VAR:+alt}, ${VAR+alt}, and $$ for a literal dollar."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        present = name in env
        val = env.get(name, "")
        if op is None:
            return val
        unset_or_empty = (not present) or (op.startswith(":") and val == "")
        kind = op[-1]
        if kind == "-":
            return arg if unset_or_empty else val
        if kind == "?":
            if unset_or_empty:
                raise InterpolationError(f"required variable {name} is missing: {arg}")
            return val
        return "" if unset_or_empty else arg  # "+"

    return _VAR.sub(repl, value)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    return node


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml parsed (YAML anchors and merge keys resolved) and interpolated with `env`
    (default: only the operator token, as an operator would export it)."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return _interpolate_tree(raw, {"BACKFILL_OPERATOR_TOKEN": TEST_TOKEN} if env is None else env)


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def service_command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        raise AssertionError("service has no command")
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def backfill_executable() -> str:
    """The `backfill` console script of the interpreter running the tests (the project's .venv)."""
    candidate = Path(sys.executable).parent / "backfill"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("backfill")
    if found is None:
        pytest.fail("the `backfill` console script is not installed (pip install -e .)", pytrace=False)
    return found


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return data


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard, as Grafana stores it."""
    exprs = []
    for p in iter_panels(dashboard()["panels"]):
        for t in p.get("targets", []):
            if t.get("expr"):
                exprs.append(t["expr"])
    return exprs


def to_promql(expr: str) -> str:
    """A dashboard expression with Grafana's global variables replaced, for Prometheus's HTTP API."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "atan2", "inf", "nan",
}  # fmt: skip
_BUILTIN_SERIES = {"up"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label matchers, ranges, strings and function names removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', to_promql(expr))
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", s):
        name = m.group(1)
        if name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def exposed_metric_names() -> set[str]:
    """Every series name service/metrics.py can expose (with _total/_bucket/_sum/_count/_created)."""
    names = set()
    for obj in vars(metrics_module).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        base = obj._name
        if isinstance(obj, Counter):
            names |= {f"{base}_total", f"{base}_created"}
        elif isinstance(obj, Histogram):
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        else:
            names.add(base)
    return names


def parse_duration(value: str) -> float:
    total, rest = 0.0, value.strip()
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", rest):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    assert re.fullmatch(r"(\d+(?:\.\d+)?(h|ms|m|s|us))+", rest), f"bad duration {value!r}"
    return total


# --- docker compose ----------------------------------------------------------------------------------------
def _compose_plugin_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_docker_compose_config_when_available() -> None:
    if not _compose_plugin_available():
        pytest.skip("`docker compose` (the compose plugin) is not installed; the structural tests below cover it")
    env = {**os.environ, "BACKFILL_OPERATOR_TOKEN": TEST_TOKEN}
    res = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr


def test_compose_requires_operator_token() -> None:
    with pytest.raises(InterpolationError, match="BACKFILL_OPERATOR_TOKEN"):
        load_compose({})
    with pytest.raises(InterpolationError, match="BACKFILL_OPERATOR_TOKEN"):
        load_compose({"BACKFILL_OPERATOR_TOKEN": ""})


def test_compose_services_and_volumes() -> None:
    c = load_compose()
    services = c["services"]
    assert set(services) == EXPECTED_SERVICES
    declared_volumes = set(c.get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: bind mount source {source} is missing"
            elif source:
                assert source in declared_volumes, f"{name}: named volume {source} is not declared"
        for dep in svc.get("depends_on", {}) or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
    for name in APP_SERVICES:
        assert "build" in services[name] and services[name]["image"] == services["api"]["image"], name


def test_compose_postgres_and_redis() -> None:
    services = load_compose()["services"]
    pg = services["postgres"]
    assert "pg_isready -h 127.0.0.1" in " ".join(pg["healthcheck"]["test"])
    assert any(v.split(":")[0] == "postgres-data" for v in pg["volumes"])
    redis = services["redis"]
    cmd = " ".join(service_command(redis))
    assert "--appendonly yes" in cmd
    assert "--maxmemory-policy noeviction" in cmd
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert any(v.split(":")[0] == "redis-data" for v in redis["volumes"])


def test_compose_app_services() -> None:
    services = load_compose()["services"]
    assert service_command(services["migrate"]) == ["backfill", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["redis"]["condition"] == "service_healthy", name
    api_cmd = service_command(services["api"])
    assert api_cmd[:6] == ["backfill", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert services["api"]["ports"] == ["8000:8000"]
    api_env = service_environment(services["api"])
    assert api_env["PROMETHEUS_MULTIPROC_DIR"] in services["api"]["tmpfs"]

    worker = services["worker"]
    assert service_command(worker) == ["backfill", "worker"]
    # Scalable with --scale worker=N: nothing that two replicas would fight over.
    assert "container_name" not in worker
    assert "ports" not in worker
    settings_fields = Settings.model_fields
    assert parse_duration(worker["stop_grace_period"]) > settings_fields["lease_seconds"].default


def test_compose_environment_is_valid_settings() -> None:
    services = load_compose()["services"]
    for name in APP_SERVICES:
        env = service_environment(services[name])
        for key in env:
            if key.startswith("BACKFILL_"):
                field = key.removeprefix("BACKFILL_").lower()
                assert field in Settings.model_fields, f"{name}: {key} is not a setting of service/config.py"
        assert env["BACKFILL_ENVIRONMENT"] == "production"
        assert env["BACKFILL_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["BACKFILL_REDIS_URL"].startswith("redis://")
        assert env["BACKFILL_OPERATOR_TOKEN"] == TEST_TOKEN
        kwargs = {k.removeprefix("BACKFILL_").lower(): v for k, v in env.items() if k.startswith("BACKFILL_")}
        s = Settings(**kwargs)  # validates like the containers will (production token rules included)
        assert s.environment == "production" and not s.is_sqlite


def test_compose_commands_exist_in_the_cli() -> None:
    """`<command> --help` succeeds for every backfill service: the sub-command and its options exist."""
    exe = backfill_executable()
    services = load_compose()["services"]
    for name in APP_SERVICES:
        cmd = service_command(services[name])
        assert cmd[0] == "backfill", f"{name}: {cmd}"
        res = subprocess.run(
            [exe, *cmd[1:], "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "BACKFILL_ENVIRONMENT": "development"},
        )
        assert res.returncode == 0, f"{name}: `{' '.join(cmd)} --help` failed:\n{res.stdout}\n{res.stderr}"
        assert "Usage" in res.stdout, name


def test_worker_metrics_port_matches_scrape_config() -> None:
    services = load_compose()["services"]
    worker_port = int(service_environment(services["worker"])["BACKFILL_METRICS_PORT"])
    assert str(worker_port) in [str(p) for p in services["worker"]["expose"]]
    prom = yaml.safe_load(PROMETHEUS_FILE.read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert {"api", "worker"} <= set(jobs)
    sd = jobs["worker"]["dns_sd_configs"]
    assert sd[0]["names"] == ["worker"] and sd[0]["type"] == "A" and sd[0]["port"] == worker_port
    assert "static_configs" not in jobs["worker"], "workers are found by DNS so that --scale works"
    assert jobs["api"]["static_configs"][0]["targets"] == ["api:8000"]
    mounted = " ".join(services["prometheus"]["volumes"])
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml" in mounted


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package `prometheus`) is not installed")
    res = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(PROMETHEUS_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


# --- Grafana -----------------------------------------------------------------------------------------------
def test_grafana_provisioning_matches_compose() -> None:
    ds = yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus" and ds[0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(DASHBOARD_PROVIDER_FILE.read_text())["providers"][0]
    grafana = load_compose()["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["./deploy/grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"


def test_dashboard_datasource_uid_matches_provisioning() -> None:
    uid = yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"][0]["uid"]
    d = dashboard()
    assert d["uid"] and d["title"]
    seen = 0
    for p in iter_panels(d["panels"]):
        if p.get("type") == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid, p["title"]
            seen += 1
    assert seen >= 10


def test_dashboard_panel_ids_are_unique_and_placed() -> None:
    ids = [p["id"] for p in iter_panels(dashboard()["panels"])]
    assert len(ids) == len(set(ids))
    for p in iter_panels(dashboard()["panels"]):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]


def test_dashboard_metrics_are_defined_in_service_metrics() -> None:
    defined = exposed_metric_names()
    for expr in dashboard_expressions():
        used = promql_metric_names(expr)
        assert used, f"no metric found in {expr!r}"
        unknown = used - defined - _BUILTIN_SERIES
        assert not unknown, f"{expr!r} uses {sorted(unknown)}, not defined in service/metrics.py"


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) "
        '(rate(backfill_search_stage_seconds_bucket{job="api"}[$__rate_interval])))'
    )
    assert promql_metric_names(expr) == {"backfill_search_stage_seconds_bucket"}
    assert promql_metric_names('sum(increase(a_total{x="b_c"}[5m])) or vector(0)') == {"a_total"}
    assert promql_metric_names('count(up{job="worker"} == 1)') == {"up"}


def test_dashboard_covers_the_rollout_and_query_path() -> None:
    exprs = dashboard_expressions()
    joined = "\n".join(exprs)
    for name in (
        "backfill_rollout_progress_ratio",
        "backfill_rollout_done_items",
        "backfill_rollout_total_items",
        "backfill_worker_items_total",
        "backfill_rollout_eta_seconds",
        "backfill_rollout_failed_items",
        "backfill_worker_failures_total",
        "backfill_http_requests_total",
        "backfill_index_vectors",
        "backfill_ingestion_lag_seconds",
        "backfill_serving_info",
    ):
        assert name in joined, name
    for q in (0.5, 0.95, 0.99):
        assert any(
            e.startswith(f"histogram_quantile({q},")
            and "backfill_search_stage_seconds_bucket" in e
            and "by (le, stage)" in e
            for e in exprs
        ), q
    assert any("backfill_http_requests_total" in e and "by (status)" in e for e in exprs)
    assert any("backfill_index_vectors" in e and "by (side)" in e for e in exprs)
    # Items/s from the workers' counter, per worker: scaling shows up on the dashboard.
    assert any("rate(backfill_worker_items_total" in e and "by (instance)" in e for e in exprs)
    for e in exprs:
        to_promql(e)  # every variable is one the test can replace for Prometheus


# --- Dockerfile --------------------------------------------------------------------------------------------
def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_layers_user_and_healthcheck() -> None:
    ins = _dockerfile_instructions()
    args = {r.split("=", 1)[0]: r.split("=", 1)[1] for w, r in ins if w == "ARG" and "=" in r}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert args["FLAVOR"] == "cpu"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    froms = [r for w, r in ins if w == "FROM"]
    assert "${PYTHON_IMAGE} AS base-cpu" in froms and "${CUDA_IMAGE} AS base-gpu" in froms
    copies = [r for w, r in ins if w == "COPY"]
    first_code = next(i for i, c in enumerate(copies) if c.startswith(("service/", "models/", "worker/")))
    assert copies.index("pyproject.toml ./") < first_code, "dependencies must be installed before the code"
    runs = [r for w, r in ins if w == "RUN"]
    deps_run = next(r for r in runs if "pip install -r /tmp/reqs.txt" in r)
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    assert '"optional-dependencies"]["gpu"]' in deps_run and "pip uninstall -y faiss-cpu" in deps_run
    assert any(c.startswith("artifacts/") for c in copies)
    users = [r for w, r in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    health = [r for w, r in ins if w == "HEALTHCHECK"]
    assert health and "/healthz" in health[-1]


def test_dockerfile_dependency_command_reads_pyproject() -> None:
    """The python one-liners of the dependency layer produce the pinned torch and the gpu extra."""
    text = DOCKERFILE.read_text()
    one_liners = re.findall(r"python -c '([^']*tomllib[^']*)'", text)
    assert len(one_liners) == 2
    outs = [
        subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
        for code in one_liners
    ]
    assert re.search(r"^torch==[\d.]+$", outs[0], re.M)
    assert any(line.startswith("faiss-gpu") for line in outs[1].splitlines())


def test_dockerignore_keeps_what_the_image_needs() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (
        "artifacts",
        "migrations",
        "alembic.ini",
        "pyproject.toml",
        "README.md",
        "service",
        "models",
        "worker",
    ):
        assert needed not in ignored, needed
    for unwanted in (".venv", ".git", "data"):
        assert unwanted in ignored, unwanted


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $SET $$SET", env) == "x d d  x $SET"
    assert interpolate("${SET:+alt}|${UNSET:+alt}|${EMPTY+alt}", env) == "alt||alt"
    assert interpolate("${SET:?need it}", env) == "x"
    with pytest.raises(InterpolationError, match="need it"):
        interpolate("${EMPTY:?need it}", env)
    assert interpolate("${EMPTY?need it}", env) == ""
