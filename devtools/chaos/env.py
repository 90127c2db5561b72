"""The chaos run's environment: constants, the artifacts and gallery, its scratch database and Redis."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import redis
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[2]
TOKEN = "chaos-operator-token-9c41e07d2b55"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PG_ADMIN_URL = os.environ.get("BACKFILL_CHAOS_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BACKFILL_CHAOS_REDIS_URL", "redis://127.0.0.1:6379/14")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shipped_artifacts() -> Path | None:
    art = REPO / "artifacts"
    if all((art / d / "manifest.json").exists() for d in ("v1", "v2", "compat-v1-v2")):
        return art
    return None


def gallery(n: int, shipped: bool) -> tuple[np.ndarray, str]:
    """(n, 28, 28) uint8 images and where they come from."""
    if shipped:
        from models.data import load_fashion_mnist

        imgs, _ = load_fashion_mnist(split="test")
        return imgs[:n].astype(np.uint8), f"Fashion-MNIST test[:{n}]"
    from devtools.fakes import gallery_images

    return gallery_images(n), f"sklearn digits x{n}"


def create_database(admin_url: str = PG_ADMIN_URL) -> str:
    """A fresh database on the server of `admin_url`, migrated to head; its URL."""
    from devtools.scratch_db import create_database as create
    from service.config import Settings
    from service.db.migrate import upgrade_head

    url = create(sa.make_url(admin_url), "backfill_chaos").render_as_string(hide_password=False)
    upgrade_head(Settings(database_url=url))
    return url


def drop_database(url: str, admin_url: str = PG_ADMIN_URL) -> None:
    from devtools.scratch_db import drop_database as drop

    drop(sa.make_url(admin_url), sa.make_url(url))


def seed(database_url: str, artifacts_dir: Path, images: np.ndarray) -> None:
    """Register v1 (serving) + v2 + compat and insert the gallery with v1 embeddings, straight into the DB."""
    from devtools.fakes import seed_gallery
    from service.config import Settings
    from service.db import make_engine, make_sessionmaker

    paths = {"v1": artifacts_dir / "v1", "v2": artifacts_dir / "v2", "compat": artifacts_dir / "compat-v1-v2"}
    engine = make_engine(Settings(database_url=database_url))
    with make_sessionmaker(engine)() as s:
        seed_gallery(s, paths, len(images), images=images)
    engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flush_redis(url: str) -> None:
    r = redis.Redis.from_url(url)
    r.flushdb()
    r.close()
