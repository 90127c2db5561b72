"""A worker counts the backfill workers registered from its host in real Redis and takes its share of the
cores (`worker.context.workers_on_host`, `ThreadPolicy`)."""

from __future__ import annotations

import pytest
import torch

from service.config import Settings
from worker.context import (
    HOST_FIELD,
    TORCH_THREADS_ENV,
    ThreadPolicy,
    configure,
    encoder_threads,
    host_cores,
    workers_on_host,
)
from worker.main import build_worker

pytestmark = pytest.mark.integration


def test_workers_registered_from_this_host_share_its_cores(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TORCH_THREADS_ENV, raising=False)
    ctx = configure(settings.model_copy(update={"metrics_port": 0}))
    assert workers_on_host(ctx) == 0
    here = [build_worker(ctx, name=f"here-{i}") for i in range(2)]
    elsewhere = build_worker(ctx, name="elsewhere")
    before = torch.get_num_threads()
    try:
        for w in [*here, elsewhere]:
            w.register_birth()
        assert workers_on_host(ctx) == 3
        ctx.redis.hset(elsewhere.key, HOST_FIELD, "another-machine's boot id")
        assert workers_on_host(ctx) == 2  # the other host's worker is not counted
        policy = ThreadPolicy(ctx, interval=3600)
        policy.tick()
        assert policy.threads == encoder_threads(host_cores(), workers=2) == torch.get_num_threads()
        here[1].register_death()
        policy.tick()
        assert policy.threads == encoder_threads(host_cores(), workers=2)  # not re-counted within the interval
        policy.checked = -float("inf")
        policy.tick()
        assert policy.threads == host_cores() == torch.get_num_threads()  # alone on the host now: every core
    finally:
        for w in [*here, elsewhere]:
            w.register_death()
        torch.set_num_threads(before)
    assert workers_on_host(ctx) == 0
