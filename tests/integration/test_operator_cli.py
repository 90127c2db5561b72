"""Issue 20's CLI against the real app (in-process) on real Postgres + Redis: `backfill items add|list`,
`rollout failures|retry-failed`, `upgrade --dry-run`, `--json`, exit codes of a rollout that really failed,
and the messages that tell a refused token from an unreachable API."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from cli import items as items_cli
from cli import rollout as rollout_cli
from cli.main import app as cli
from devtools.fakes import make_artifacts
from models.preprocess import encode_png
from service.api.app import create_app
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.db.models import Item
from worker import context, driver, plan

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration
AUTH = {"Authorization": "Bearer dev-operator-token"}


@pytest.fixture
def api(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    s = settings.model_copy(
        update={"artifacts_dir": make_artifacts(tmp_path / "artifacts"), "ingest_poll_seconds": 0.05, "max_attempts": 2}
    )
    monkeypatch.setenv("BACKFILL_DATA_DIR", str(tmp_path / "client-data"))  # where the journal goes
    from service.config import get_settings

    get_settings.cache_clear()
    with TestClient(create_app(s)) as client:
        assert client.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        client.headers.update(AUTH)
        monkeypatch.setattr(rollout_cli, "_client", lambda api_url: contextlib.nullcontext(client))
        yield s
    get_settings.cache_clear()


def write_folder(root: Path, n: int, seed: int = 0) -> list[bytes]:
    imgs = np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    data = [encode_png(im) for im in imgs]
    for i, b in enumerate(data):
        folder = root / str(i % 3)  # class folders: labels from folder names
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:03d}.png").write_bytes(b)
    return data


def gallery(settings: Settings) -> dict[str, int | None]:
    with make_sessionmaker(make_engine(settings))() as s:
        return {
            e: lbl for e, lbl in s.execute(sa.select(Item.external_id, Item.label).where(Item.deleted_at.is_(None)))
        }


def test_items_add_loads_a_folder_refuses_bad_files_and_resumes(
    api: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "images"
    write_folder(root, 23)
    (root / "0" / "broken.png").write_bytes(b"not a png at all")
    runner = CliRunner()

    # Interrupted (Ctrl-C) after the second request: what the API took is in the journal.
    calls = {"n": 0}
    real_post = items_cli._post

    def post_then_interrupt(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_post(*args, **kwargs)

    monkeypatch.setattr(items_cli, "_post", post_then_interrupt)
    out = runner.invoke(cli, ["items", "add", str(root), "--batch-size", "5", "--labels-from-folders"])
    assert out.exit_code == items_cli.EXIT_INTERRUPTED and "run the same command again" in out.output, out.output
    first = gallery(api)
    assert 0 < len(first) <= 10
    monkeypatch.setattr(items_cli, "_post", real_post)

    out = runner.invoke(cli, ["items", "add", str(root), "--batch-size", "5", "--labels-from-folders"])
    assert out.exit_code == items_cli.EXIT_REFUSED, out.output  # the broken file
    assert f"skipped {len(first)} already in the journal" in out.output
    assert "refused 0__broken.png" in out.output and "image_b64" in out.output
    loaded = gallery(api)
    expected = {f"{i % 3}__img{i:03d}.png": i % 3 for i in range(23)}
    assert loaded == expected  # every good file once, with its folder's label; the broken one not at all

    out = runner.invoke(cli, ["items", "list", "--limit", "3", "--json"])
    page = json.loads(out.output)
    assert page["total"] == 23 and len(page["items"]) == 3 and page["next_cursor"]
    out = runner.invoke(cli, ["items", "list", "--model", "v1"])
    assert out.exit_code == 0 and out.output.startswith("23 item(s) in v1's space"), out.output


def test_items_add_reads_ndjson_and_list_files(api: Settings, tmp_path: Path) -> None:
    data = write_folder(tmp_path / "imgs", 4, seed=5)
    del data
    nd = tmp_path / "items.ndjson"
    nd.write_text('{"id": "a", "path": "imgs/0/img000.png", "label": 7}\n{"id": "b", "path": "imgs/1/img001.png"}\n')
    lst = tmp_path / "items.txt"
    lst.write_text("# comment\nimgs/2/img002.png,4\nimgs/0/img003.png\n")
    out = CliRunner().invoke(cli, ["items", "add", str(nd), str(lst)])
    assert out.exit_code == 0, out.output
    assert gallery(api) == {"a": 7, "b": None, "img002.png": 4, "img003.png": None}


def test_a_really_failed_rollout_exits_3_and_retry_failed_completes_it(api: Settings, tmp_path: Path) -> None:
    root = tmp_path / "images"
    data = write_folder(root, 12, seed=2)
    runner = CliRunner()
    assert runner.invoke(cli, ["items", "add", str(root)]).exit_code == 0
    maker = make_sessionmaker(make_engine(api))
    with maker() as s:
        s.execute(sa.update(Item).where(Item.external_id == "1__img004.png").values(payload=b"garbage"))
        s.commit()

    out = runner.invoke(cli, ["upgrade", "--to", "v2", "--dry-run"])
    assert out.exit_code == 0 and "dry run: v1 -> v2, 12 items; nothing was changed" in out.output, out.output
    out = runner.invoke(cli, ["upgrade", "--to", "v2", "--policy", "fifo", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["status"] == "planning"
    out = runner.invoke(cli, ["status", "1"])
    assert "warning: no worker is registered" in out.output, out.output
    context.configure(api)
    plan.plan_rollout(1)
    driver.drive(context.get_context(), 1)

    out = runner.invoke(cli, ["status", "1", "--watch", "--json", "--interval", "0.1"])
    assert out.exit_code == rollout_cli.EXIT_FAILED, out.output
    assert json.loads(out.output.splitlines()[0])["status"] == "failed"
    out = runner.invoke(cli, ["rollout", "failures", "1"])
    assert out.exit_code == 0 and "1 failed item(s); by reason: 1 invalid payload" in out.output, out.output
    assert "1__img004.png  attempts=2" in out.output

    with maker() as s:  # the fix
        s.execute(sa.update(Item).where(Item.external_id == "1__img004.png").values(payload=data[4]))
        s.commit()
    out = runner.invoke(cli, ["rollout", "retry-failed", "1"])
    assert out.exit_code == 0 and "retrying 1 item(s)" in out.output and "status=running" in out.output, out.output
    driver.drive(context.get_context(), 1)
    out = runner.invoke(cli, ["status", "1", "--watch", "--interval", "0.1"])
    assert out.exit_code == 0 and "status=completed done=12/12" in out.output, out.output


def test_token_and_connection_errors_say_which(api: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    client = rollout_cli._client("x").__enter__()  # the in-process client of the fixture
    client.headers["Authorization"] = "Bearer wrong-token"
    monkeypatch.setenv("BACKFILL_OPERATOR_TOKEN", "wrong-token")
    out = runner.invoke(cli, ["rollout", "pause", "1"])
    assert out.exit_code == 1 and "refused the operator token" in out.output and "does not match" in out.output
    monkeypatch.setattr(rollout_cli, "_client", lambda url: rollout_cli.httpx.Client(base_url=url))  # port 9: none
    out = runner.invoke(cli, ["status", "--api-url", "http://127.0.0.1:9"])
    assert out.exit_code == 2 and "cannot connect to the API at http://127.0.0.1:9" in out.output, out.output
