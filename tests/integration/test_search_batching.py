"""POST /search micro-batching through HTTP: concurrent clients (mixed k, one bad image among them) each get
exactly the answer the unbatched path gives for their own query, and the requests really were batched."""

from __future__ import annotations

import base64
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devtools.fakes import make_artifacts
from service.api.app import create_app
from service.config import Settings
from tests.integration.test_api import add, b64, images

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration


@pytest.fixture
def client(settings: Settings, tmp_path: Path) -> Iterator[TestClient]:
    art = make_artifacts(tmp_path / "artifacts")
    update = {"artifacts_dir": art, "max_k": 50, "search_batch_max": 8, "search_batch_wait_ms": 20.0}
    settings = settings.model_copy(update=update)
    with TestClient(create_app(settings)) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        yield c


def set_batching(client: TestClient, on: bool) -> None:
    app: Any = client.app
    app.state.settings = app.state.settings.model_copy(update={"search_batching": on})


def check_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert [h["id"] for h in got["results"]] == [h["id"] for h in want["results"]]
    assert [h["source"] for h in got["results"]] == [h["source"] for h in want["results"]]
    np.testing.assert_allclose(
        [h["distance"] for h in got["results"]], [h["distance"] for h in want["results"]], rtol=1e-4, atol=1e-5
    )
    assert got["serving"] == want["serving"]


def test_concurrent_searches_are_batched_and_each_gets_its_own_answer(client: TestClient) -> None:
    add(client, images(120, seed=1))
    qs = images(48, seed=2)
    ks = [1 + (i * 11) % 50 for i in range(len(qs))]
    bodies: list[dict[str, Any]] = [{"image_b64": b64(q), "k": k} for q, k in zip(qs, ks, strict=True)]
    bad = len(bodies)
    bodies.append({"image_b64": base64.b64encode(b"not an image at all").decode(), "k": 5})

    set_batching(client, False)
    want = [client.post("/search", json=b) for b in bodies]
    assert all(r.status_code == 200 for r in want[:bad]), [r.text for r in want if r.status_code != 200]
    assert want[bad].status_code == 422

    set_batching(client, True)
    start = threading.Barrier(16)

    def post(i: int) -> Any:
        if i < 16:
            start.wait(10)  # the first wave arrives together
        return client.post("/search", json=bodies[i])

    order = list(range(len(bodies)))
    order[3], order[bad] = order[bad], order[3]  # the bad image goes in the first wave
    with ThreadPoolExecutor(16) as pool:
        got = dict(zip(order, pool.map(post, order), strict=True))

    assert got[bad].status_code == 422 and got[bad].json()["detail"]["field"] == want[bad].json()["detail"]["field"]
    for i in range(bad):
        assert got[i].status_code == 200, got[i].text
        assert len(got[i].json()["results"]) == ks[i]
        check_same(got[i].json(), want[i].json())
    batcher = client.app.state.search_batcher  # type: ignore[attr-defined]
    assert batcher.largest > 1  # requests shared calls
    assert batcher.requests == bad  # every good request went through the batcher; the bad one failed alone


def test_batching_off_still_serves(client: TestClient) -> None:
    add(client, images(10, seed=3))
    set_batching(client, False)
    r = client.post("/search", json={"image_b64": b64(images(1, seed=3)[0]), "k": 3})
    assert r.status_code == 200
    assert r.json()["results"][0]["id"] == "item-0" and len(r.json()["results"]) == 3
    assert getattr(client.app.state, "search_batcher", None) is None  # type: ignore[attr-defined]
