"""One model cache, one identity rule (name or pair + checksum) in the API runtime and the worker: a compat pack
re-registered for the same pair (new checksum) reaches both, on a real SQLite database with tiny artifacts."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from devtools.fakes import V1_DIM, make_artifacts
from models.artifacts import CompatPack, load_compat
from service.config import Settings
from service.db import queries
from service.model_cache import EncoderRef, ModelCache
from service.registry import register_artifacts
from service.runtime import Runtime
from worker import context
from worker.context import WorkerContext

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    arts = make_artifacts(tmp_path / "artifacts", seed=0)
    return Settings(data_dir=tmp_path / "data", artifacts_dir=arts, redis_url=redis_url, use_gpu=False)


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime.create(settings)
    rt.start(follow=False)  # migrates the SQLite file, registers the artifacts, builds the follower
    yield rt
    rt.stop()


def worker_pack(ctx: WorkerContext) -> CompatPack:
    """The worker's path to a pack: the row read now (as the plan job reads it), then the cache."""
    with ctx.sessionmaker() as s:
        row = queries.compat_pack(s, "v1", "v2")
        assert row is not None
    return ctx.compat(row)


def retrain_pack(settings: Settings, tmp_path: Path) -> None:
    """Replace compat-v1-v2 in the artifacts directory by one with other weights, and register it again."""
    other = make_artifacts(tmp_path / "retrained", seed=1)
    target = settings.artifacts_dir / "compat-v1-v2"
    shutil.rmtree(target)
    shutil.copytree(other / "compat-v1-v2", target)


def test_a_re_registered_pack_reaches_the_api_and_the_worker(
    settings: Settings, runtime: Runtime, tmp_path: Path
) -> None:
    old_vecs = np.random.default_rng(0).standard_normal((5, V1_DIM)).astype(np.float32)
    ctx = context.configure(settings)
    api_before = runtime.compat("v1", "v2")
    assert runtime.compat("v1", "v2") is api_before  # cached: no reload per call
    before = api_before.forward(old_vecs)
    np.testing.assert_allclose(worker_pack(ctx).forward(old_vecs), before, rtol=1e-5)

    retrain_pack(settings, tmp_path)
    with runtime.sessionmaker() as s:
        res = register_artifacts(s, settings.artifacts_dir)
    assert "compat-v1-v2" in res.updated
    expected = load_compat(settings.artifacts_dir / "compat-v1-v2").forward(old_vecs)
    assert not np.allclose(expected, before, atol=1e-3)

    # API: the next follower cycle re-reads the registered artifacts; the query path then loads the new pack.
    assert runtime.follower is not None
    runtime.follower.sync_once()
    np.testing.assert_allclose(runtime.forward("v1", "v2", old_vecs), expected, rtol=1e-5, atol=1e-6)
    # Worker: the same identity rule, from the row it reads.
    np.testing.assert_allclose(worker_pack(ctx).forward(old_vecs), expected, rtol=1e-5, atol=1e-6)
    with runtime.sessionmaker() as s:
        row = queries.compat_pack(s, "v1", "v2")
        assert row is not None
    assert runtime.models.loaded()["v1->v2"] == ctx.models.loaded()["v1->v2"] == row.checksum


def test_the_identity_is_name_and_checksum_not_path(settings: Settings, tmp_path: Path) -> None:
    loads: list[str] = []
    cache = ModelCache(settings.artifacts_dir, lambda: "cpu", on_encoder_load=loads.append)
    v1 = settings.artifacts_dir / "v1"
    moved = shutil.copytree(v1, tmp_path / "moved-v1")
    first = cache.encoder(EncoderRef("v1", str(v1), "sum-a"))
    assert cache.encoder(EncoderRef("v1", str(moved), "sum-a")) is first  # same weights, moved directory
    assert cache.encoder(EncoderRef("v1", "v1", "sum-a")) is first  # a relative path, resolved in artifacts_dir
    second = cache.encoder(EncoderRef("v1", str(moved), "sum-b"))  # another checksum: another artifact
    assert second is not first
    assert loads == ["v1", "v1"]
    assert cache.loaded() == {"v1": "sum-b"}
