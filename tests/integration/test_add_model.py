"""Bring your own encoder: POST /models and `backfill models add` validate an artifact before registering it;
every broken one is a 4xx naming the problem and leaves the registry unchanged. Postgres + Redis."""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from devtools.fakes import TinyEncoder, make_artifacts
from models.artifacts import save_encoder
from service.api.app import create_app
from service.config import Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer dev-operator-token"}


class NaNs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :8] * float("nan")


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.flatten(1)[:, :8] + torch.rand(x.shape[0], 8), dim=1)


class Raw(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :8] * 3.0 + 1.0


def _b64(module: nn.Module) -> str:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buf)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def client(settings: Settings, tmp_path: Path) -> Iterator[TestClient]:
    s = settings.model_copy(update={"artifacts_dir": make_artifacts(tmp_path / "art")})
    with TestClient(create_app(s)) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        yield c


@pytest.mark.parametrize(
    ("module", "dim", "problem"),
    [
        (TinyEncoder(12, mix=False), 10, "declared dim 10, but a batch of 8 images gives shape (8, 12)"),
        (NaNs(), 8, "outputs are not finite"),
        (Noisy(), 8, "not deterministic"),
        (Raw(), 8, "not L2-normalised"),
        (None, 8, "not loadable"),
    ],
)
def test_a_broken_encoder_is_refused_and_nothing_is_registered(
    client: TestClient, module: nn.Module | None, dim: int, problem: str
) -> None:
    before = client.get("/models", headers=AUTH).json()
    files_before = sorted(p.name for p in client.app.state.runtime.settings.artifacts_dir.iterdir())  # type: ignore[attr-defined]
    blob = _b64(module) if module is not None else base64.b64encode(b"not a torchscript file").decode()
    r = client.post("/models", json={"name": "v9", "dim": dim, "model_b64": blob}, headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["field"] == "model_b64" and problem in r.json()["detail"]["problem"], r.text
    assert client.get("/models", headers=AUTH).json() == before
    files_after = sorted(p.name for p in client.app.state.runtime.settings.artifacts_dir.iterdir())  # type: ignore[attr-defined]
    assert files_after == files_before  # no staging folder, no half-written artifact left behind


def test_a_valid_encoder_is_registered_once_and_a_clash_is_409(client: TestClient) -> None:
    torch.manual_seed(3)
    good = _b64(TinyEncoder(12, mix=False))
    r = client.post("/models", json={"name": "v9", "dim": 12, "model_b64": good}, headers=AUTH)
    assert r.status_code == 201 and r.json()["name"] == "v9" and r.json()["status"] == "registered", r.text
    again = client.post("/models", json={"name": "v9", "dim": 12, "model_b64": good}, headers=AUTH)
    assert again.status_code == 201  # the same artifact: idempotent
    torch.manual_seed(4)
    other = _b64(TinyEncoder(12, mix=False))
    clash = client.post("/models", json={"name": "v9", "dim": 12, "model_b64": other}, headers=AUTH)
    assert clash.status_code == 409 and clash.json()["detail"]["field"] == "name"
    names = [m["name"] for m in client.get("/models", headers=AUTH).json()["models"]]
    assert names.count("v9") == 1
    assert client.post("/models", json={"name": "v9", "dim": 12, "model_b64": good}).status_code == 401
    bad = client.post("/models", json={"name": "v9", "dim": 12, "model_b64": "@@@"}, headers=AUTH)
    assert bad.status_code == 422 and "base64" in bad.json()["detail"]["problem"]


def test_cli_models_add_validates_and_registers(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from service.config import get_settings

    art = make_artifacts(tmp_path / "art")
    save_encoder(NaNs(), tmp_path / "nan", {"name": "bad", "dim": 8})
    torch.manual_seed(5)
    save_encoder(TinyEncoder(12, mix=False), tmp_path / "mine", {"name": "mine", "dim": 12})
    monkeypatch.setenv("BACKFILL_DATABASE_URL", str(settings.database_url))
    monkeypatch.setenv("BACKFILL_ARTIFACTS_DIR", str(art))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        refused = runner.invoke(app, ["models", "add", str(tmp_path / "nan")])
        assert refused.exit_code == 2 and "outputs are not finite" in refused.output
        ok = runner.invoke(app, ["models", "add", str(tmp_path / "mine")])
        assert ok.exit_code == 0 and "registered mine (dim 12" in ok.output, ok.output
        assert (art / "mine" / "manifest.json").is_file() and not (art / "bad").exists()
    finally:
        get_settings.cache_clear()
