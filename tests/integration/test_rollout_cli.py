"""`backfill upgrade|status|rollout ...` against the rollout API (in-process ASGI transport)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
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
from service.redis_conn import make_redis
from worker import context, driver, plan

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette asks for `httpx2`; its httpx fallback works
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration
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
