"""The deployment files agree with the code: docker-compose.yml (structure, commands that exist in the CLI,
settings that exist, required secrets, the internal network), the Prometheus scrape config, the Grafana
provisioning and dashboard (metric names that service/metrics.py defines, the provisioned datasource uid), the
Dockerfile and .dockerignore, and the deploy test's script and its place in CI and the README.

No Docker engine is needed: `docker compose config` (v2) and `docker-compose config` (v1) are used when
installed, and the file is always checked structurally with PyYAML (after a compose-style `${VAR}`
interpolation) as well. `make deploy-test` runs the stack for real. The helpers here are shared with
tests/integration/test_deploy_stack.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase
from sqlalchemy.engine import make_url

from devtools.dashboard import DASHBOARD_FILE, GRAFANA_VARS, dashboard, dashboard_expressions, iter_panels, to_promql
from service import metrics as metrics_module
from service.config import Settings
from service.redis_conn import redis_url

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_FILE = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DATASOURCE_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_FILE = GRAFANA_DIR / "provisioning" / "dashboards" / "backfill.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

TEST_TOKEN = "compose-test-operator-token-0123456789"
# What an operator must export besides the token (no defaults in the compose file).
COMPOSE_SECRETS = {"POSTGRES_PASSWORD": "pg-test-password_0123", "REDIS_PASSWORD": "redis-test-password_4567"}
REQUIRED_VARS = ("BACKFILL_OPERATOR_TOKEN", "POSTGRES_PASSWORD", "REDIS_PASSWORD")
APP_SERVICES = ("migrate", "api", "worker")
EXPECTED_SERVICES = {"postgres", "redis", "migrate", "api", "worker", "prometheus", "grafana"}
# `--profile milvus` (docs/scale.md): Milvus standalone with its etcd and MinIO, and an api / worker pair using it.
MILVUS_SERVICES = {"milvus-etcd", "milvus-minio", "milvus", "api-milvus", "worker-milvus"}
MILVUS_ENV = {"BACKFILL_INDEX_BACKEND": "milvus", "BACKFILL_MILVUS_URI": "http://milvus:19530"}
__all__ = ["DASHBOARD_FILE", "GRAFANA_VARS", "dashboard", "dashboard_expressions", "iter_panels", "to_promql"]


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
    (default: the token and the two passwords, as an operator would export them)."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return _interpolate_tree(raw, {"BACKFILL_OPERATOR_TOKEN": TEST_TOKEN, **COMPOSE_SECRETS} if env is None else env)


def default_services(compose: dict[str, Any]) -> dict[str, Any]:
    """The services `docker compose up` starts: those in no profile."""
    return {name: svc for name, svc in compose["services"].items() if not svc.get("profiles")}


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


def _compose_commands() -> list[list[str]]:
    """The compose implementations installed here: v2 (`docker compose`) and/or v1 (`docker-compose`)."""
    found = []
    if _compose_plugin_available():
        found.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    return found


def _compose_config(
    cmd: list[str], env: dict[str, str], empty_env_file: Path, profile: str | None = None
) -> subprocess.CompletedProcess[str]:
    empty_env_file.write_text("")  # so that a local .env supplies nothing
    keep = {k: v for k, v in os.environ.items() if k not in REQUIRED_VARS}
    profiles = ["--profile", profile] if profile else []
    return subprocess.run(
        [*cmd, "-f", str(COMPOSE_FILE), "--env-file", str(empty_env_file), *profiles, "config", "--quiet"],
        capture_output=True,
        text=True,
        env={**keep, **env},
        timeout=60,
    )


def test_compose_implementations_accept_the_file_and_refuse_missing_secrets(tmp_path: Path) -> None:
    """Each installed compose (v1 and/or v2) accepts the file with the three secrets and refuses it, naming the
    variable, without any one of them."""
    commands = _compose_commands()
    if not commands:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; the structural tests cover it")
    full = {"BACKFILL_OPERATOR_TOKEN": TEST_TOKEN, **COMPOSE_SECRETS}
    for cmd in commands:
        res = _compose_config(cmd, full, tmp_path / "empty.env")
        assert res.returncode == 0, f"{cmd}: {res.stderr}"
        res = _compose_config(cmd, full, tmp_path / "empty.env", profile="milvus")
        assert res.returncode == 0, f"{cmd} --profile milvus: {res.stderr}"
        for var in REQUIRED_VARS:
            res = _compose_config(cmd, {k: v for k, v in full.items() if k != var}, tmp_path / "empty.env")
            assert res.returncode != 0 and var in res.stderr + res.stdout, f"{cmd} without {var}: {res.stderr}"


def test_compose_requires_token_and_passwords() -> None:
    full = {"BACKFILL_OPERATOR_TOKEN": TEST_TOKEN, **COMPOSE_SECRETS}
    load_compose(full)
    # no default anywhere: every use of a secret is `${VAR:?message}`
    uses = re.findall(r"\$\{(" + "|".join(REQUIRED_VARS) + r")([^}]*)\}", COMPOSE_FILE.read_text())
    assert len(uses) >= 5 and all(rest.startswith(":?") for _, rest in uses), uses
    for var in REQUIRED_VARS:
        with pytest.raises(InterpolationError, match=var):
            load_compose({k: v for k, v in full.items() if k != var})
        with pytest.raises(InterpolationError, match=var):
            load_compose({**full, var: ""})


def test_compose_file_is_v1_compatible() -> None:
    """Compose v1 rejects a top-level `name:` and any top-level key but version/services/networks/volumes/
    configs/secrets and x- extensions."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    allowed = {"version", "services", "networks", "volumes", "configs", "secrets"}
    assert not {k for k in raw if k not in allowed and not k.startswith("x-")}, sorted(raw)


def test_compose_networks_keep_postgres_and_redis_internal() -> None:
    c = load_compose()
    assert c["networks"]["backend"]["internal"] is True
    assert not (c["networks"].get("frontend") or {}).get("internal")
    services = c["services"]
    expected = {
        "postgres": {"backend"},
        "redis": {"backend"},
        "migrate": {"backend"},
        "worker": {"backend"},
        "api": {"backend", "frontend"},
        "prometheus": {"backend", "frontend"},
        "grafana": {"frontend"},
    }
    expected |= {"milvus-etcd": {"backend"}, "milvus-minio": {"backend"}, "milvus": {"backend"}}
    expected |= {"api-milvus": {"backend", "frontend"}, "worker-milvus": {"backend"}}
    for name, nets in expected.items():
        assert set(services[name]["networks"]) == nets, name
    published = {name for name, svc in default_services(c).items() if svc.get("ports")}
    assert published == {"api", "prometheus", "grafana"}
    assert {name for name, svc in services.items() if svc.get("ports")} - published == {"api-milvus"}
    for name in ("prometheus", "grafana"):
        assert all(str(p).startswith("127.0.0.1:") for p in services[name]["ports"]), name


def test_compose_passwords_reach_postgres_redis_and_the_app() -> None:
    """The password the Postgres and Redis containers require is the one in the URLs the app connects with, as
    SQLAlchemy and redis-py parse them."""
    services = load_compose()["services"]
    pg_password = service_environment(services["postgres"])["POSTGRES_PASSWORD"]
    assert pg_password == COMPOSE_SECRETS["POSTGRES_PASSWORD"]
    redis_cmd = service_command(services["redis"])
    assert redis_cmd[redis_cmd.index("--requirepass") + 1] == COMPOSE_SECRETS["REDIS_PASSWORD"]
    assert service_environment(services["redis"])["REDISCLI_AUTH"] == COMPOSE_SECRETS["REDIS_PASSWORD"]
    for name in APP_SERVICES:
        env = service_environment(services[name])
        s = Settings(**{k.removeprefix("BACKFILL_").lower(): v for k, v in env.items() if k.startswith("BACKFILL_")})
        db = make_url(s.sqlalchemy_url)
        assert (db.username, db.password, db.host, db.database) == ("backfill", pg_password, "postgres", "backfill")
        pool = redis.Redis.from_url(redis_url(s)).connection_pool
        assert pool.connection_kwargs["password"] == COMPOSE_SECRETS["REDIS_PASSWORD"], name
        assert pool.connection_kwargs["host"] == "redis", name


def test_compose_services_and_volumes() -> None:
    c = load_compose()
    services = c["services"]
    assert set(default_services(c)) == EXPECTED_SERVICES
    assert set(services) == EXPECTED_SERVICES | MILVUS_SERVICES
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
    for name in (*APP_SERVICES, "api-milvus", "worker-milvus"):
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


def test_compose_milvus_profile_adds_milvus_and_leaves_the_default_stack() -> None:
    """`--profile milvus`: Milvus standalone (pinned official images, its etcd and MinIO healthy first), and an
    api / worker pair identical to the default ones but for the backend settings, the api's host port and the
    wait for Milvus. Without the profile nothing of it starts and no default service names Milvus."""
    c = load_compose()
    services = c["services"]
    for name in MILVUS_SERVICES:
        assert services[name]["profiles"] == ["milvus"], name
    for name, svc in default_services(c).items():
        env = service_environment(svc)
        assert not {k for k in env if k in MILVUS_ENV}, name
        assert "milvus" not in (svc.get("depends_on") or {}), name
    images = {name: services[name]["image"] for name in ("milvus", "milvus-etcd", "milvus-minio")}
    assert images["milvus"].startswith("milvusdb/milvus:v2.")
    assert images["milvus-etcd"].startswith("quay.io/coreos/etcd:v3.")
    assert images["milvus-minio"].startswith("minio/minio:RELEASE.")
    for dep in ("milvus-etcd", "milvus-minio"):
        assert services["milvus"]["depends_on"][dep]["condition"] == "service_healthy"
    env = service_environment(services["milvus"])
    assert env["ETCD_ENDPOINTS"] == "milvus-etcd:2379" and env["MINIO_ADDRESS"] == "milvus-minio:9000"
    assert env["MINIO_ACCESS_KEY_ID"] == service_environment(services["milvus-minio"])["MINIO_ACCESS_KEY"]
    assert env["MINIO_SECRET_ACCESS_KEY"] == service_environment(services["milvus-minio"])["MINIO_SECRET_KEY"]
    assert "19530" in MILVUS_ENV["BACKFILL_MILVUS_URI"] and "milvus" in services
    for base, name in (("api", "api-milvus"), ("worker", "worker-milvus")):
        a, b = services[base], services[name]
        assert service_environment(b) == {**service_environment(a), **MILVUS_ENV}, name
        assert b["depends_on"] == {**a["depends_on"], "milvus": {"condition": "service_healthy"}}, name
        same = {k: v for k, v in a.items() if k not in ("environment", "depends_on", "ports")}
        assert {k: v for k, v in b.items() if k not in ("environment", "depends_on", "ports", "profiles")} == same
        s = Settings(
            **{
                k.removeprefix("BACKFILL_").lower(): v
                for k, v in service_environment(b).items()
                if k.startswith("BACKFILL_")
            }
        )
        assert (s.index_backend, s.milvus_uri) == ("milvus", "http://milvus:19530"), name
    assert services["api-milvus"]["ports"] == ["8001:8000"]
    assert services["api"]["ports"] == ["8000:8000"]


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


def test_dockerfile_builds_with_the_classic_builder_and_one_base() -> None:
    """No BuildKit-only syntax, and every stage from the one base chosen by a build argument: the classic builder
    builds every stage of a multi-stage file, so a CUDA stage would be pulled even for a CPU build."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax=", text, re.M | re.I), "`# syntax=` needs a registry (BuildKit)"
    assert not re.search(r"RUN\s+--(mount|network|security)", text), "RUN --mount/--network need BuildKit"
    assert "<<" not in text, "heredocs need BuildKit"
    ins = _dockerfile_instructions()
    args = {r.split("=", 1)[0]: r.split("=", 1)[1] for w, r in ins if w == "ARG" and "=" in r}
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["FLAVOR"] == "cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    froms = [r.split() for w, r in ins if w == "FROM"]
    assert froms[0] == ["${BASE_IMAGE}", "AS", "base"], froms
    stages = {"base"}
    for f in froms[1:]:
        assert f[0] in stages and f[1] == "AS", f"stage {f} does not start from an earlier stage"
        stages.add(f[2])
    assert "nvidia/cuda" not in " ".join(r for w, r in ins if w != "FROM")


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        ("", "install torch==2.13.0"),
        ("https://example.org/whl/cpu", "install torch==2.13.0 --index-url https://example.org/whl/cpu"),
    ],
)
def test_dockerfile_torch_index_argument(index: str, expected: str) -> None:
    """The torch install of the dependency layer, run by bash with a `pip` that prints its arguments: an empty
    TORCH_INDEX_URL means pip's default index (and whatever wheels pip is offered), a set one is the only index."""
    run = next(r for w, r in _dockerfile_instructions() if w == "RUN" and "TORCH_INDEX_URL" in r)
    fragment = re.search(r'if \[ -n "\$TORCH_INDEX_URL" \].*?fi;', run)
    assert fragment, run
    script = f'pip() {{ echo "$*"; }}; torch_req=torch==2.13.0; TORCH_INDEX_URL="{index}"; {fragment.group(0)}'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected


def test_compose_build_arguments() -> None:
    """Compose passes the flavour, base image and torch index to the build; an empty BACKFILL_TORCH_INDEX_URL
    stays empty (`${VAR-default}`), which the sandbox engine needs."""
    env = {"BACKFILL_OPERATOR_TOKEN": TEST_TOKEN, **COMPOSE_SECRETS}
    args = load_compose(env)["services"]["api"]["build"]["args"]
    assert args == {
        "FLAVOR": "cpu",
        "BASE_IMAGE": "python:3.11-slim",
        "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu",
    }
    assert (
        load_compose({**env, "BACKFILL_TORCH_INDEX_URL": ""})["services"]["api"]["build"]["args"]["TORCH_INDEX_URL"]
        == ""
    )


def test_dockerfile_layers_user_and_healthcheck() -> None:
    ins = _dockerfile_instructions()
    copies = [r for w, r in ins if w == "COPY"]
    first_code = next(i for i, c in enumerate(copies) if c.startswith(("service/", "models/", "worker/")))
    requirements = next(i for i, c in enumerate(copies) if c.startswith("--from=requirements"))
    assert requirements < first_code, "dependencies must be installed before the code"
    runs = [r for w, r in ins if w == "RUN"]
    reqs_run = next(r for r in runs if "tomllib" in r)
    assert '["project"]["dependencies"]' in reqs_run and '"optional-dependencies"]["gpu"]' in reqs_run
    deps_run = next(r for r in runs if "pip install -r /tmp/reqs.txt" in r)
    assert "pip uninstall -y faiss-cpu" in deps_run and "pip install -r /tmp/gpu.txt" in deps_run
    # the smoke checks: torch and faiss import and work, the last one as the user the containers run as
    assert "import faiss, numpy, torch" in deps_run
    user_at = next(i for i, (w, _) in enumerate(ins) if w == "USER")
    assert any(w == "RUN" and "torch.jit.load" in r and "faiss" in r for w, r in ins[user_at:])
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
