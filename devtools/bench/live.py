"""The live service for sections 3 and 5: the real app under uvicorn in this process on a scratch Postgres
+ Redis, mid-rollout (reverse): half the gallery backfilled (NEW, v2), half not (OLD, v1)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from devtools.bench.common import Artifacts, fashion_test, free_port, scratch_database
from devtools.bench.config import BenchConfig


@dataclass
class LiveService:
    base_url: str
    runtime: Any
    item_ids: list[int]
    old_ids: list[int]
    v2: np.ndarray
    images: np.ndarray
    db_url: str
    data: str
    app: Any = None  # the FastAPI app (section 3's concurrency windows switch its settings)


def _seed_mid_rollout(maker: Any, art: Artifacts, images: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The gallery with v1 embeddings, v2 embeddings for its first half, and a running rollout v1 -> v2."""
    import sqlalchemy as sa

    from devtools.fakes import seed_gallery
    from models.artifacts import load_encoder
    from service.db.models import Embedding, Rollout

    n = len(images)
    with maker() as s:
        ids = seed_gallery(s, art.dirs, n, images=images)
    v2 = load_encoder(art.dirs["v2"]).embed(images)
    half = n // 2
    with maker() as s:
        s.execute(
            sa.insert(Embedding),
            [
                {"item_id": i, "model_version": "v2", "vector": v.astype("<f4").tobytes()}
                for i, v in zip(ids[:half], v2[:half], strict=True)
            ],
        )
        s.add(
            Rollout(
                from_version="v1",
                to_version="v2",
                mode="reverse",
                policy="uncertainty",
                status="running",
                batch_size=256,
                active_lock=1,
            )
        )
        s.commit()
    return ids, v2


@contextlib.contextmanager
def _serving(app: Any) -> Iterator[str]:
    """`app` under uvicorn on a loopback port in a thread, ready; its base URL."""
    import httpx
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    th = threading.Thread(target=server.run, name="bench-uvicorn", daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline or not th.is_alive():
                raise RuntimeError("the API did not become ready")
            time.sleep(0.2)
        yield base
    finally:
        server.should_exit = True
        th.join(30)


@contextlib.contextmanager
def live_service(cfg: BenchConfig, art: Artifacts, n: int) -> Iterator[LiveService]:
    """The real app under uvicorn in this process on a scratch Postgres + Redis, mid-rollout (reverse):
    half the gallery backfilled (NEW, v2), half not (OLD, v1)."""
    import redis as redis_lib

    from service.api.app import create_app
    from service.config import Settings
    from service.db import make_engine, make_sessionmaker

    images, _, data = fashion_test(cfg, n)
    with scratch_database(cfg, "bench_api") as db_url:
        redis_lib.Redis.from_url(cfg.redis).flushdb()
        settings = Settings(
            database_url=db_url,
            redis_url=cfg.redis,
            artifacts_dir=art.root,
            log_level="WARNING",
            data_dir=Path(tempfile.gettempdir()) / f"bench-api-{os.getpid()}",
            use_gpu=False,
        )
        engine = make_engine(settings)
        try:
            ids, v2 = _seed_mid_rollout(make_sessionmaker(engine), art, images)
            app = create_app(settings)
            with _serving(app) as base:
                yield LiveService(base, app.state.runtime, ids, ids[n // 2 :], v2, images, db_url, data, app)
        finally:
            engine.dispose()
