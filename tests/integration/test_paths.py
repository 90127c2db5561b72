"""Query paths, the predicted choice, the live probe and the guard, through the real app on Postgres + Redis.

A quick pair (seconds, sklearn digits) is trained once; its pack carries real predictions on the calibration
split (`annotate_pack`). A sabotaged copy of the pack (psi with random weights) gives a path that must dip.
"""

from __future__ import annotations

import base64
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.artifacts import load_compat, save_compat
from models.compat import Transform
from models.data import load
from models.evaluate import ap_at_k
from models.paths import PATHS, annotate_pack
from models.preprocess import encode_png
from models.train import Recipe, train_all
from service.api.app import create_app
from service.config import Settings
from service.db.models import Rollout
from worker import context, plan

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer dev-operator-token"}
N_ITEMS = 240


def _annotate(art: Path) -> None:
    x, y = load("digits", "train")
    c = Recipe.quick().calib_size
    annotate_pack(art / "compat-v1-v2", art / "v1", art / "v2", x[-c:], y[-c:], {"dataset": "digits"})


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    art = tmp_path_factory.mktemp("pair")
    torch.set_num_threads(1)
    train_all(art, Recipe.quick(), progress=False)
    _annotate(art)
    return art


@pytest.fixture(scope="module")
def sabotaged(pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same pair with psi replaced by a random map: reverse queries land anywhere in v1 space."""
    art = tmp_path_factory.mktemp("sabotaged")
    for name in ("v1", "v2"):
        shutil.copytree(pair / name, art / name)
    pack = load_compat(pair / "compat-v1-v2")
    torch.manual_seed(7)
    manifest = {k: v for k, v in pack.manifest.items() if k not in ("checksum", "kind", "predictions")}
    save_compat(Transform(pack.to_dim, pack.from_dim, 16), pack.h, pack.sigma, art / "compat-v1-v2", manifest)
    _annotate(art)
    return art


def _settings(settings: Settings, art: Path) -> Settings:
    update = {"artifacts_dir": art, "ingest_poll_seconds": 0.05, "probe_queries": 60, "probe_k": 20}
    return settings.model_copy(update=update)


@pytest.fixture
def make_client(settings: Settings) -> Iterator[Callable[[Path], TestClient]]:
    stack: list[Any] = []

    def make(art: Path) -> TestClient:
        s = _settings(settings, art)
        context.configure(s)  # the plan job runs in-process
        c = TestClient(create_app(s))
        c.__enter__()
        stack.append(c)
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        x, y = load("digits", "test")
        items = [
            {"id": f"d-{i}", "image_b64": base64.b64encode(encode_png(x[i])).decode(), "label": int(y[i])}
            for i in range(N_ITEMS)
        ]
        r = c.post("/items", json={"items": items}, headers=AUTH)
        assert r.status_code == 200 and r.json()["searchable"], r.text
        return c

    yield make
    for c in stack:
        c.__exit__(None, None, None)


def _queries(n: int = 12) -> list[dict[str, str]]:
    x, _ = load("digits", "test")
    return [{"image_b64": base64.b64encode(encode_png(x[-1 - i])).decode()} for i in range(n)]


def _search(c: TestClient) -> list[list[tuple[str, float]]]:
    r = c.post("/search/batch", json={"queries": _queries(), "k": 10}, headers=AUTH)
    assert r.status_code == 200, r.text
    return [[(h["id"], h["distance"]) for h in row] for row in r.json()["results"]]


def _wait_mode(c: TestClient, mode: str | None, timeout: float = 20.0) -> None:
    rt = c.app.state.runtime  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ix = rt.manager.current
        if ix is not None and ix.layout.mode == mode:
            return
        time.sleep(0.05)
    raise AssertionError(f"layout never reached mode {mode}")


def _rollout(c: TestClient, rid: int) -> dict[str, Any]:
    return dict(c.get(f"/rollouts/{rid}", headers=AUTH).json())


def test_auto_takes_the_best_predicted_path_that_never_dips(
    make_client: Callable[[Path], TestClient], pair: Path
) -> None:
    client = make_client(pair)
    pack = next(p for p in client.get("/models", headers=AUTH).json()["compat_packs"])
    pred = pack["predictions"]
    assert set(pred["curves"]) == set(PATHS)
    r = client.post("/upgrade", json={"to": "v2"}, headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    chosen = body["path"]["predicted"]
    schedule, order = chosen["schedule"], body["policy"]
    assert body["mode"] == schedule[0][1] and body["path"]["requested"] == "auto"
    # the chosen curve is the scheduled paths' own predicted curves, spliced at the switch
    fractions = np.asarray(pred["fractions"])
    expected = np.asarray(pred["curves"][schedule[-1][1]][order]["map"])
    if len(schedule) == 2:
        first = fractions < schedule[1][0] - 1e-4  # the switch fraction is stored rounded to 5 decimals
        expected = np.where(first, pred["curves"][schedule[0][1]][order]["map"], expected)
    assert np.allclose(chosen["map"], expected, atol=1e-5)
    # it never falls below old/old, and no single path that never does has a higher AUC
    assert min(chosen["map"]) >= pred["old_old"] - 1e-9
    for path, by_order in pred["curves"].items():
        values = np.asarray(by_order[order]["map"])
        if values.min() >= pred["old_old"] - 1e-9:
            assert chosen["auc"] >= values.mean() - 1e-5, path
    assert body["path"]["encoder_passes"] == (2 if body["mode"] == "two-pass" else 1)


def test_a_path_predicted_to_dip_is_refused_unless_forced(
    make_client: Callable[[Path], TestClient], sabotaged: Path
) -> None:
    client = make_client(sabotaged)
    curve = client.get("/models", headers=AUTH).json()["compat_packs"][0]["predictions"]["curves"]["reverse"]
    assert min(curve["uncertainty"]["worst_margin"], curve["random"]["worst_margin"]) < 0  # random psi dips
    r = client.post("/upgrade", json={"to": "v2", "mode": "reverse"}, headers=AUTH)
    assert r.status_code == 409, r.text
    assert r.json()["detail"]["field"] == "mode" and "predicted to fall" in r.json()["detail"]["problem"]
    assert client.get("/rollouts", headers=AUTH).json()["rollouts"] == []  # nothing was created
    r = client.post("/upgrade", json={"to": "v2", "mode": "reverse", "force": True}, headers=AUTH)
    assert r.status_code == 202 and r.json()["path"]["reason"].startswith("forced"), r.text
    # and auto never takes it
    assert client.post(f"/rollouts/{r.json()['id']}/abort", headers=AUTH).status_code == 200
    auto = client.post("/upgrade", json={"to": "v2"}, headers=AUTH).json()
    assert auto["mode"] != "reverse"


def test_old_only_serves_exactly_old_old_and_two_pass_keeps_its_ranking(
    make_client: Callable[[Path], TestClient], pair: Path
) -> None:
    client = make_client(pair)
    before = _search(client)
    rid = client.post("/upgrade", json={"to": "v2", "mode": "old-only"}, headers=AUTH).json()["id"]
    _wait_mode(client, "old-only")
    assert _search(client) == before  # same ids, same distances: the v1 model alone
    metrics = client.get("/metrics").text

    def passes(path: str) -> float:
        line = next(
            (x for x in metrics.splitlines() if x.startswith(f'backfill_query_encoder_passes_total{{path="{path}"')),
            None,
        )
        return float(line.split()[-1]) if line else 0.0

    r = client.patch(f"/rollouts/{rid}", json={"mode": "two-pass"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["mode"] == "two-pass", r.text
    _wait_mode(client, "two-pass")
    base = passes("two-pass")
    two = _search(client)
    # nothing is backfilled yet: OLD answers with v1 queries; calibration is monotone, so the ids keep their order
    assert [[h[0] for h in row] for row in two] == [[h[0] for h in row] for row in before]
    metrics = client.get("/metrics").text
    assert passes("two-pass") - base == 2 * len(_queries())


def test_live_probe_measures_the_real_path_and_matches_the_baseline_on_old_only(
    make_client: Callable[[Path], TestClient], pair: Path
) -> None:
    client = make_client(pair)
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    rid = client.post("/upgrade", json={"to": "v2", "mode": "old-only"}, headers=AUTH).json()["id"]
    plan.plan_rollout(rid)
    probe = _rollout(client, rid)["path"]["probe"]
    assert probe["queries"] == 60 and probe["k"] == 20
    _wait_mode(client, "old-only")
    live = rt.prober.once()
    # old-only is v1 alone: the live path (images -> encoder -> FAISS index) equals the brute-force baseline
    # over stored vectors
    assert live == pytest.approx(probe["baseline_map"], abs=1e-4)
    # and the baseline itself, recomputed here by numpy over the DB's vectors
    with rt.sessionmaker() as s:
        row = s.get(Rollout, rid)
        assert row is not None and row.probe is not None
        ids = row.probe["items"]
    assert _numpy_old_old(rt, ids, k=20) == pytest.approx(probe["baseline_map"], abs=1e-5)  # stored rounded
    after = _rollout(client, rid)
    assert after["path"]["probe"]["live_map"] == pytest.approx(live, abs=1e-5)
    assert after["status"] == "running" and after["path"]["guard"] is None


def _numpy_old_old(rt: Any, probe_ids: list[int], k: int) -> float:
    import sqlalchemy as sa

    from service.db.models import Embedding, Item

    with rt.sessionmaker() as s:
        rows = s.execute(
            sa.select(Item.id, Item.label, Embedding.vector)
            .join(Embedding, Embedding.item_id == Item.id)
            .where(Embedding.model_version == "v1", Item.deleted_at.is_(None))
        ).all()
    ids = np.array([r[0] for r in rows])
    labels = np.array([r[1] for r in rows])
    vecs = np.stack([np.frombuffer(r[2], dtype="<f4") for r in rows]).astype(np.float64)
    aps = []
    for pid in probe_ids:
        q = int(np.nonzero(ids == pid)[0][0])
        d = ((vecs - vecs[q]) ** 2).sum(1)
        d[q] = np.inf
        order = np.argsort(d, kind="stable")[:k]
        ap, _ = ap_at_k(order[None, :], labels, labels[q : q + 1], k)
        aps.append(float(ap[0]))
    return float(np.mean(aps))


def test_guard_pauses_a_forced_dipping_path_and_falls_back_to_old_only(
    make_client: Callable[[Path], TestClient], sabotaged: Path
) -> None:
    client = make_client(sabotaged)
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    before = _search(client)
    rid = client.post("/upgrade", json={"to": "v2", "mode": "reverse", "force": True}, headers=AUTH).json()["id"]
    plan.plan_rollout(rid)
    _wait_mode(client, "reverse")
    assert _search(client) != before  # the random psi really changes what users get
    live = rt.prober.once()
    r = _rollout(client, rid)
    baseline = r["path"]["probe"]["baseline_map"]
    assert live < baseline - rt.settings.guard_margin
    assert r["status"] == "paused" and r["mode"] == "old-only"
    assert r["path"]["guard"]["path"] == "reverse" and r["path"]["guard"]["live_map"] == pytest.approx(live, abs=1e-5)
    assert "guard" in r["path"]["reason"]
    _wait_mode(client, "old-only")
    assert _search(client) == before  # users are back on old/old exactly
    # a second measurement on the safe path does not trip again
    assert rt.prober.once() == pytest.approx(baseline, abs=1e-4)
    assert _rollout(client, rid)["status"] == "paused"


def test_an_auto_rollout_follows_its_schedule_once_and_never_after_the_guard(
    make_client: Callable[[Path], TestClient], pair: Path
) -> None:
    from service.paths import follow_schedule

    client = make_client(pair)
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    rid = client.post("/upgrade", json={"to": "v2"}, headers=AUTH).json()["id"]
    plan.plan_rollout(rid)
    with rt.sessionmaker() as s:
        row = s.get(Rollout, rid)
        assert row is not None and row.status == "running"
        row.mode, row.predicted = (
            "two-pass",
            {**(row.predicted or {}), "schedule": [[0.0, "two-pass"], [0.5, "reverse"]]},
        )
        s.commit()
        assert follow_schedule(s, row, 0.3, None) is None  # still in the first segment
        other = rt.sessionmaker()  # a second process racing for the same switch
        other_row = other.get(Rollout, rid)
        assert follow_schedule(s, row, 0.6, None) == "reverse"
        assert follow_schedule(other, other_row, 0.6, None) is None  # its conditional update finds mode changed
        other.close()
        s.refresh(row)
        assert row.mode == "reverse" and "as scheduled" in (row.path_reason or "")
    _wait_mode(client, "reverse")
    with rt.sessionmaker() as s:
        row = s.get(Rollout, rid)
        assert row is not None
        row.mode, row.guard = "old-only", {"path": "reverse"}
        s.commit()
        assert follow_schedule(s, row, 0.9, None) is None  # the guard's fallback is not undone by the schedule
