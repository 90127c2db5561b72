"""Redis is not a code-execution path: jobs travel as JSON, and a pickled payload pushed into the backfill
queue is refused by the worker, never unpickled. The control half shows the same payload does run code in
a worker with RQ's default (pickle) serializer, so the test can fail."""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
from rq import Queue, SimpleWorker

from service.config import Settings
from service.redis_conn import job_queue
from worker.context import configure
from worker.main import build_worker

pytestmark = pytest.mark.integration


class Touch:
    """Unpickling this creates a file: stands for any code an attacker could name."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (pathlib.Path.touch, (str(self.path),))  # type: ignore[return-value]


def test_a_pickled_job_is_refused_not_executed(settings: Settings, tmp_path: Path) -> None:
    ctx = configure(settings.model_copy(update={"metrics_port": 0}))
    marker = tmp_path / "executed"
    attacker = Queue(settings.queue_name, connection=ctx.redis)  # RQ's default serializer: pickle
    attacker.enqueue("builtins.print", Touch(marker))
    assert job_queue(ctx.redis, settings).count == 1
    build_worker(ctx).work(burst=True)
    assert not marker.exists(), "the worker unpickled a payload from Redis"
    assert job_queue(ctx.redis, settings).count == 0  # taken off the queue and failed, not retried forever

    attacker.enqueue("builtins.print", Touch(marker))
    SimpleWorker([attacker], connection=ctx.redis).work(burst=True)  # control: a pickle worker runs it
    assert marker.exists()


def test_jobs_are_stored_as_json(settings: Settings) -> None:
    import json
    import zlib

    from service import rollouts

    ctx = configure(settings.model_copy(update={"metrics_port": 0}))
    assert rollouts.enqueue_plan(ctx.redis, settings, 7)
    raw = ctx.redis.hget(f"rq:job:{rollouts.plan_job_id(7)}", "data")
    assert raw is not None
    func, _instance, args, _kwargs = json.loads(zlib.decompress(raw))
    assert func == rollouts.PLAN_JOB and args == [7]
