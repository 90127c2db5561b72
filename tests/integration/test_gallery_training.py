"""Any model pair: v1 -> v2 -> v3 where no compat pack exists, each pack trained on the live gallery (label-free
sample) during the rollout's `training` phase; every item searchable at every phase. Postgres + Redis."""

from __future__ import annotations

import base64
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from devtools.fakes import TinyEncoder
from models.artifacts import save_encoder
from models.data import load
from models.preprocess import encode_png
from service.api.app import create_app
from service.config import Settings
from worker import context, plan, train
from worker.main import build_worker

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer dev-operator-token"}
N = 120


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, context.WorkerContext]]:
    art = tmp_path / "artifacts"
    torch.manual_seed(0)
    for name, dim in (("v1", 12), ("v2", 20), ("v3", 16)):
        save_encoder(TinyEncoder(dim, mix=False), art / name, {"name": name, "dim": dim})
    s = settings.model_copy(
        update={
            "artifacts_dir": art,
            "ingest_poll_seconds": 0.05,
            "max_k": N,
            "train_sample": 80,
            "probe_queries": 30,
            "probe_k": 10,
            "batch_size": 16,
        }
    )
    ctx = context.configure(s)
    with TestClient(create_app(s)) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        x, _ = load("digits", "test")
        items = [{"id": f"g-{i}", "image_b64": base64.b64encode(encode_png(x[i])).decode()} for i in range(N)]
        assert c.post("/items", json={"items": items}, headers=AUTH).json()["searchable"]  # no labels at all
        yield c, ctx


def _settled(c: TestClient, rid: int | None, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until this API's indices follow the database: the rollout's layout, every item on one side."""
    rt = c.app.state.runtime  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ix = rt.manager.current
        want = None if rid is None else c.get(f"/rollouts/{rid}", headers=AUTH).json()
        active = want is not None and want["status"] not in ("completed", "failed", "aborted")
        same_rollout = ix is not None and ix.layout.rollout_id == (rid if active else None)
        if same_rollout and (not active or ix.layout.mode == want["mode"]) and sum(ix.sides().values()) == N:
            return {"layout": ix.layout, "sides": ix.sides(), "rollout": want}
        time.sleep(0.05)
    raise AssertionError("the API did not settle")


def _all_searchable(c: TestClient) -> None:
    """Self-queries with k = every item: each query's own item is in its answer, and every answer holds all N."""
    x, _ = load("digits", "test")
    picks = [0, 17, 42, 77, 119]
    queries = [{"image_b64": base64.b64encode(encode_png(x[i])).decode()} for i in picks]
    r = c.post("/search/batch", json={"queries": queries, "k": N}, headers=AUTH)
    assert r.status_code == 200, r.text
    for i, row in zip(picks, r.json()["results"], strict=True):
        ids = [h["id"] for h in row]
        assert len(ids) == N and len(set(ids)) == N and f"g-{i}" in ids


def _upgrade(c: TestClient, ctx: context.WorkerContext, to: str) -> int:
    r = c.post("/upgrade", json={"to": to}, headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    rid = int(body["id"])
    assert body["status"] == "training" and body["mode"] == "old-only" and body["training"]["sample"] == 80
    st = _settled(c, rid)
    assert st["sides"] == {"new": 0, "old": N}  # training: the old model alone, exactly as before
    _all_searchable(c)

    out = train.train_rollout(rid)
    assert out["trained"] and out["planning"]
    st = _settled(c, rid)
    ro = st["rollout"]
    assert ro["status"] == "planning" and ro["training"]["done"] and ro["training"]["sample"] == 80
    assert ro["path"]["predicted"] is not None and ro["path"]["requested"] == "auto"
    packs = {(p["from"], p["to"]): p for p in c.get("/models", headers=AUTH).json()["compat_packs"]}
    pack = packs[(ro["from"], to)]
    assert pack["predictions"]["probe"]["relevance"].startswith("pseudo-labels")  # the gallery has no labels
    assert set(pack["calibrated_modes"]) == {"reverse", "forward", "two-pass"}
    _all_searchable(c)

    plan.plan_rollout(rid)
    ro = c.get(f"/rollouts/{rid}", headers=AUTH).json()
    assert ro["status"] == "running" and ro["done"] >= 80  # the training sample stays backfilled
    _settled(c, rid)
    _all_searchable(c)
    build_worker(ctx).work(burst=True)  # the drivers the plan enqueued run to completion
    st = _settled(c, rid)
    assert st["rollout"]["status"] == "completed"
    _all_searchable(c)
    return rid


def test_chained_upgrades_train_their_packs_on_the_gallery(stack: tuple[TestClient, context.WorkerContext]) -> None:
    c, ctx = stack
    _upgrade(c, ctx, "v2")
    models = {m["name"]: m["status"] for m in c.get("/models", headers=AUTH).json()["models"]}
    assert models == {"v1": "retired", "v2": "serving", "v3": "registered"}
    _upgrade(c, ctx, "v3")
    models = {m["name"]: m["status"] for m in c.get("/models", headers=AUTH).json()["models"]}
    assert models == {"v1": "retired", "v2": "retired", "v3": "serving"}
    assert (Path(ctx.settings.artifacts_dir) / "compat-v2-v3" / "manifest.json").is_file()


def test_a_second_upgrade_while_one_runs_is_refused_and_mixes_nothing(
    stack: tuple[TestClient, context.WorkerContext],
) -> None:
    c, _ = stack
    first = c.post("/upgrade", json={"to": "v2"}, headers=AUTH).json()
    r = c.post("/upgrade", json={"to": "v3"}, headers=AUTH)
    assert r.status_code == 409 and f"rollout {first['id']} is training" in r.json()["detail"]["problem"]
    st = _settled(c, first["id"])
    assert st["layout"].to_model == "v2"


def test_pause_stops_training_and_resume_goes_back_to_it(stack: tuple[TestClient, context.WorkerContext]) -> None:
    c, _ = stack
    rid = c.post("/upgrade", json={"to": "v2"}, headers=AUTH).json()["id"]
    assert c.post(f"/rollouts/{rid}/pause", headers=AUTH).json()["status"] == "paused"
    assert train.train_rollout(rid) == {"rollout_id": rid, "trained": False}  # a paused rollout does not train
    assert c.post(f"/rollouts/{rid}/resume", headers=AUTH).json()["status"] == "training"
    assert train.train_rollout(rid)["planning"]
    assert np.isfinite(c.get(f"/rollouts/{rid}", headers=AUTH).json()["path"]["predicted"]["auc"])


def test_train_gallery_cli_registers_a_pack_an_upgrade_then_uses(
    stack: tuple[TestClient, context.WorkerContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from service.config import get_settings

    c, ctx = stack
    s = ctx.settings
    monkeypatch.setenv("BACKFILL_DATABASE_URL", str(s.database_url))
    monkeypatch.setenv("BACKFILL_REDIS_URL", str(s.redis_url))
    monkeypatch.setenv("BACKFILL_ARTIFACTS_DIR", str(s.artifacts_dir))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        bad = runner.invoke(app, ["train", "gallery", "--old", "v1", "--new", "nope"])
        assert bad.exit_code == 2 and "not registered: nope" in bad.output
        out = runner.invoke(app, ["train", "gallery", "--old", "v1", "--new", "v2", "--sample", "60", "--threads", "1"])
        assert out.exit_code == 0, out.output
        assert "wrote and registered" in out.output and "auto:" in out.output
    finally:
        get_settings.cache_clear()
    context.configure(s)  # the CLI configured its own worker context
    packs = c.get("/models", headers=AUTH).json()["compat_packs"]
    assert [(p["from"], p["to"], p["predictions"]["probe"]["relevance"][:6]) for p in packs] == [("v1", "v2", "pseudo")]
    r = c.post("/upgrade", json={"to": "v2"}, headers=AUTH).json()
    assert r["status"] == "planning" and r["training"] is None  # the pack exists: no training phase
