"""`backfill upgrade|status|rollout ...` against the rollout API (in-process ASGI transport)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from pydantic import SecretStr
from typer.testing import CliRunner

from cli import rollout as rollout_cli
from cli.main import app as cli
from devtools.fakes import make_tiny_artifacts, seed_gallery
from service.api.errors import install as install_error_handlers
from service.api.rollouts import router
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.db.models import Rollout
from service.redis_conn import make_redis
from worker import context, driver, plan

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette asks for `httpx2`; its httpx fallback works
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration
REAL_CLIENT = rollout_cli._client  # before any test swaps it for the in-process client
TOKEN = "cli-test-operator-token-000"


@pytest.fixture
def api(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    artifacts = make_tiny_artifacts(tmp_path / "artifacts")
    s = settings.model_copy(update={"operator_token": SecretStr(TOKEN), "artifacts_dir": tmp_path / "artifacts"})
    maker = make_sessionmaker(make_engine(s))
    with maker() as session:
        seed_gallery(session, artifacts, 30)
    app = FastAPI()
    install_error_handlers(app)  # the app's handlers answer the domain's errors
    app.include_router(router)
    app.state.settings = s
    app.state.runtime = SimpleNamespace(settings=s, sessionmaker=maker, redis=make_redis(s))
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        monkeypatch.setattr(rollout_cli, "_client", lambda api_url: client)
        yield s


def test_upgrade_status_and_control(api: Settings) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["upgrade", "--to", "v2", "--policy", "fifo", "--batch-size", "10"])
    assert out.exit_code == 0, out.output
    assert "rollout 1 v1->v2" in out.output and "status=planning" in out.output

    context.configure(api)
    plan.plan_rollout(1)
    assert driver.drive(context.get_context(), 1).outcome == "completed"

    out = runner.invoke(cli, ["status", "--watch", "--interval", "0.1"])
    assert out.exit_code == 0, out.output
    assert "status=completed done=30/30 (100.0%)" in out.output

    out = runner.invoke(cli, ["status", "1", "--json"])
    assert out.exit_code == 0 and '"fraction": 1.0' in out.output

    out = runner.invoke(cli, ["rollout", "pause", "1"])
    assert out.exit_code == 1 and "409" in out.output and "status" in out.output
    out = runner.invoke(cli, ["upgrade", "--to", "v2", "--mode", "sideways"])
    assert out.exit_code == 1 and "mode" in out.output


def test_throttle_and_abort(api: Settings) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["upgrade", "--to", "v2"]).exit_code == 0
    out = runner.invoke(cli, ["rollout", "throttle", "1", "25"])
    assert out.exit_code == 0 and "throttle=25.0" in out.output
    out = runner.invoke(cli, ["rollout", "throttle", "1", "off"])
    assert out.exit_code == 0 and "throttle=off" in out.output
    assert runner.invoke(cli, ["rollout", "throttle", "1", "fast"]).exit_code == 2
    out = runner.invoke(cli, ["rollout", "abort", "1", "--purge"])
    assert out.exit_code == 0 and "status=aborted" in out.output


def test_watch_exit_codes_tell_how_the_rollout_ended(api: Settings) -> None:
    """--watch: 0 when the rollout completed, 4 when it was aborted, 3 when it failed."""
    runner = CliRunner()
    assert runner.invoke(cli, ["upgrade", "--to", "v2"]).exit_code == 0
    assert runner.invoke(cli, ["rollout", "abort", "1"]).exit_code == 0
    out = runner.invoke(cli, ["status", "1", "--watch", "--interval", "0.1"])
    assert out.exit_code == rollout_cli.EXIT_ABORTED == 4 and "aborted" in out.output, out.output

    assert runner.invoke(cli, ["upgrade", "--to", "v2", "--policy", "fifo"]).exit_code == 0
    maker = make_sessionmaker(make_engine(api))
    with maker() as s:  # a rollout that ends with failed items (as after max_attempts bad payloads)
        s.execute(sa.update(Rollout).where(Rollout.id == 2).values(status="failed", active_lock=None, error="boom"))
        s.commit()
    out = runner.invoke(cli, ["status", "2", "--watch", "--interval", "0.1"])
    assert out.exit_code == rollout_cli.EXIT_FAILED == 3 and "boom" in out.output, out.output
    out = runner.invoke(cli, ["status", "2"])  # without --watch it only reports
    assert out.exit_code == 0


def test_an_empty_operator_token_sends_no_header(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty BACKFILL_OPERATOR_TOKEN was "Illegal header value b'Bearer '": now reads go without it and
    writes get the API's own 401, which names the token."""
    for token, expected in (("", None), ("op-token-123", "Bearer op-token-123")):
        s = settings.model_copy(update={"operator_token": SecretStr(token)})
        monkeypatch.setattr(rollout_cli, "get_settings", lambda s=s: s)
        with REAL_CLIENT("http://127.0.0.1:9") as client:
            assert client.headers.get("authorization") == expected


def test_models_register_refuses_a_single_artifact_folder(api: Settings, tmp_path: Path) -> None:
    artifacts = make_tiny_artifacts(tmp_path / "more")
    runner = CliRunner()
    out = runner.invoke(cli, ["models", "register", str(artifacts["v2"])])
    assert out.exit_code == 2 and "pass the folder that contains it" in out.output, out.output
    empty = tmp_path / "empty"
    empty.mkdir()
    out = runner.invoke(cli, ["models", "register", str(empty)])
    assert out.exit_code == 2 and "no encoders or compat packs" in out.output, out.output
