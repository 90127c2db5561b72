"""The README's "Operating a rollout" block, run as written: its commands are read from README.md (so the two
cannot drift) and run one by one in a shell against a real `backfill serve` and `backfill worker` on the test
Postgres and Redis. A `# exit N` comment on a line is the exit code that line must end with (0 otherwise).
Between loading the folder and upgrading, the test corrupts one stored image, as a disk or a bad writer
would, so the rollout really ends `failed` and the failure-handling steps have something to handle."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from devtools.fakes import make_artifacts
from models.preprocess import encode_png
from service.config import REPO_ROOT, Settings
from service.db import make_engine, make_sessionmaker
from service.db.models import Item, ModelVersion
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
BAD_ITEM = "1__img004.png"


def readme_commands() -> list[tuple[str, int]]:
    """(command, expected exit code) of each line of the section's bash block."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Operating a rollout", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    out = []
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        if command.strip():
            m = re.search(r"\bexit (\d+)", comment)
            out.append((command.strip(), int(m.group(1)) if m else 0))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[dict[str, str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '')}",
        BACKFILL_DATABASE_URL=str(settings.database_url),
        BACKFILL_REDIS_URL=str(settings.redis_url),
        BACKFILL_ARTIFACTS_DIR=str(make_artifacts(tmp_path / "artifacts")),
        BACKFILL_DATA_DIR=str(tmp_path / "data"),
        BACKFILL_API_URL=f"http://127.0.0.1:{port}",
        BACKFILL_MAX_ATTEMPTS="2",
        BACKFILL_METRICS_PORT="0",
        BACKFILL_INGEST_POLL_SECONDS="0.1",
        ITEM=BAD_ITEM,
    )
    env["_PORT"] = str(port)
    yield env


def start(command: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    args = command.rstrip("&").split()
    if args[1] == "serve":
        args += ["--port", env["_PORT"]]
    log = (cwd / f"{args[1]}.log").open("wb")
    return subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def corrupt(settings: Settings, external_id: str) -> None:
    with make_sessionmaker(make_engine(settings))() as s:
        s.execute(sa.update(Item).where(Item.external_id == external_id).values(payload=b"\x89PNG corrupt"))
        s.commit()


def test_the_operating_a_rollout_block_runs_as_written(
    stack: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    commands = readme_commands()
    background = [c for c, _ in commands if c.endswith("&")]
    assert [c.split()[:2] for c in background] == [["backfill", "serve"], ["backfill", "worker"]]
    imgs = np.random.default_rng(7).integers(0, 256, size=(24, 28, 28), dtype=np.uint8)
    for i, im in enumerate(imgs):
        folder = tmp_path / "images" / str(i % 3)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:03d}.png").write_bytes(encode_png(im))

    procs = []
    try:
        for command in background:
            procs.append(start(command, stack, tmp_path))
        url = stack["BACKFILL_API_URL"]

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=120, interval=0.5, message=lambda: (tmp_path / "serve.log").read_text()[-2000:])
        transcript = []
        for command, expected in commands:
            if command.endswith("&"):
                continue
            if command.startswith("backfill upgrade") and "--watch" in command:
                corrupt(settings, BAD_ITEM)
            r = subprocess.run(
                ["bash", "-c", command], env=stack, cwd=tmp_path, capture_output=True, text=True, timeout=180
            )
            transcript.append(f"$ {command}\n{r.stdout}{r.stderr[-1500:]}")
            assert r.returncode == expected, "\n".join(transcript)
        with make_sessionmaker(make_engine(settings))() as s:
            serving = s.scalar(sa.select(ModelVersion.name).where(ModelVersion.status == "serving"))
            live = s.scalar(sa.select(sa.func.count()).select_from(Item).where(Item.deleted_at.is_(None)))
        assert serving == "v1" and live == 24  # rolled back, nothing lost
        text = "\n".join(transcript)
        assert "by reason: 1 invalid payload" in text and BAD_ITEM in text
        assert "retrying 1 item(s)" in text and "status=completed done=24/24" in text
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
