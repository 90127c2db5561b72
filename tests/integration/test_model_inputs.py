"""Two models with different inputs served side by side: a 28 x 28 gray TorchScript v1 and an operator's ONNX
model that takes 16 x 12 RGB, centre-cropped and normalised, uploaded through POST /models. The gallery is
colour PNGs; the upgrade trains its pack on the gallery, backfills, and every stored vector of the new model
equals the TorchScript original run on inputs prepared here by hand. Postgres + Redis."""

from __future__ import annotations

import base64
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from PIL import Image

from devtools.fakes import TinyEncoder
from models.artifacts import export_onnx, save_encoder
from models.data import load
from models.preprocess import InputSpec, encode_png
from service.api.app import create_app
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.db.models import Embedding, Item
from tests.helpers import wait_until
from worker import context, plan, train
from worker.main import build_worker

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration
pytest.importorskip("onnxruntime")

AUTH = {"Authorization": "Bearer dev-operator-token"}
N = 90
SPEC = InputSpec(channels=3, size=(16, 12), resize="crop", crop_fraction=0.875, mean=(0.4, 0.5, 0.6), std=(0.25,) * 3)


def _colour(i: int) -> np.ndarray:
    """Digit i of the test split, 28 x 28, tinted with a colour that depends on i (so RGB carries information)."""
    x, _ = load("digits", "test")
    tint = np.array([(i * 37) % 256, (i * 91) % 256, (i * 53) % 256]) / 255.0
    return (x[i][..., None] * (0.3 + 0.7 * tint)).astype(np.uint8)


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, context.WorkerContext, Path]]:
    art, src = tmp_path / "artifacts", tmp_path / "operator"
    torch.manual_seed(0)
    save_encoder(TinyEncoder(12, mix=False), art / "v1", {"name": "v1", "dim": 12})
    save_encoder(
        TinyEncoder(10, mix=False, in_features=3 * 16 * 12),
        src / "c3",
        {"name": "c3", "dim": 10, "input": SPEC.to_manifest()},
    )
    export_onnx(src / "c3", src / "c3-onnx", name="c3o")
    s = settings.model_copy(
        update={
            "artifacts_dir": art,
            "ingest_poll_seconds": 0.05,
            "max_k": N,
            "train_sample": 60,
            "train_steps": 150,
            "batch_size": 16,
        }
    )
    ctx = context.configure(s)
    with TestClient(create_app(s)) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        items = [{"id": f"g-{i}", "image_b64": base64.b64encode(encode_png(_colour(i))).decode()} for i in range(N)]
        assert c.post("/items", json={"items": items}, headers=AUTH).json()["searchable"]
        yield c, ctx, src


def _by_hand(i: int) -> np.ndarray:
    """SPEC applied with PIL and NumPy: 28 x 28 -> scale 0.571 / 0.875 -> 18 x 18, crop (3, 1, 15, 17)."""
    img = Image.open(io.BytesIO(encode_png(_colour(i)))).convert("RGB").resize((18, 18), Image.Resampling.BILINEAR)
    a = np.asarray(img.crop((3, 1, 15, 17)), dtype=np.float32) / 255.0
    return ((a - np.array([0.4, 0.5, 0.6])) / 0.25).transpose(2, 0, 1).astype(np.float32)


def _self_queries_hit(c: TestClient, picks: list[int]) -> None:
    queries = [{"image_b64": base64.b64encode(encode_png(_colour(i))).decode()} for i in picks]
    r = c.post("/search/batch", json={"queries": queries, "k": N}, headers=AUTH)
    assert r.status_code == 200, r.text
    for i, row in zip(picks, r.json()["results"], strict=True):
        assert len({h["id"] for h in row}) == N and f"g-{i}" in {h["id"] for h in row}


def test_an_onnx_rgb_model_upgrades_a_gray_gallery_model(
    stack: tuple[TestClient, context.WorkerContext, Path],
) -> None:
    c, ctx, src = stack
    onnx_b64 = base64.b64encode((src / "c3-onnx" / "model.onnx").read_bytes()).decode()
    body = {"name": "c3o", "dim": 10, "format": "onnx", "model_b64": onnx_b64}
    bad = c.post("/models", json={**body, "input": {**SPEC.to_manifest(), "mean": [0.4]}}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["detail"]["field"] == "input"
    assert "input.mean" in bad.json()["detail"]["problem"]
    wrong = c.post("/models", json={**body, "input": {"channels": 1}}, headers=AUTH)  # the model wants RGB 16 x 12
    assert wrong.status_code == 422 and "probe batch" in wrong.json()["detail"]["problem"]
    assert [m["name"] for m in c.get("/models", headers=AUTH).json()["models"]] == ["v1"]  # nothing registered
    r = c.post("/models", json={**body, "input": SPEC.to_manifest()}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "onnx" and r.json()["input"] == SPEC.to_manifest()

    rid = c.post("/upgrade", json={"to": "c3o"}, headers=AUTH).json()["id"]
    assert train.train_rollout(rid)["planning"]
    pack = json.loads((Path(ctx.settings.artifacts_dir) / "compat-v1-c3o" / "manifest.json").read_text())
    assert pack["config"]["min_steps"] == 150  # BACKFILL_TRAIN_STEPS
    plan.plan_rollout(rid)
    build_worker(ctx).work(burst=True)
    assert c.get(f"/rollouts/{rid}", headers=AUTH).json()["status"] == "completed"
    rt = c.app.state.runtime  # type: ignore[attr-defined]
    assert wait_until(lambda: rt.manager.current.layout.query_model == "c3o", timeout=20)
    _self_queries_hit(c, [0, 31, 89])

    engine = make_engine(ctx.settings)
    try:
        with make_sessionmaker(engine)() as s:
            rows = s.execute(
                sa.select(Item.external_id, Embedding.vector)
                .join(Embedding, Embedding.item_id == Item.id)
                .where(Embedding.model_version == "c3o")
            ).all()
    finally:
        engine.dispose()
    assert len(rows) == N
    stored = {ext: np.frombuffer(v, dtype="<f4") for ext, v in rows}
    picks = [0, 5, 44, 89]
    original = torch.jit.load(str(src / "c3" / "model.pt"))
    with torch.no_grad():
        want = original(torch.from_numpy(np.stack([_by_hand(i) for i in picks]))).numpy()
    np.testing.assert_allclose(np.stack([stored[f"g-{i}"] for i in picks]), want, atol=1e-5)
