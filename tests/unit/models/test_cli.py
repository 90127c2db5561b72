from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cli.evaluate import register as register_eval
from cli.train import register
from models import evaluate as E
from models.artifacts import discover, load_compat, load_encoder
from models.data import load


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("noop")(lambda: None)
    register(app)
    register_eval(app)
    return app


@pytest.mark.slow
def test_train_all_quick_then_eval_curve(tmp_path: Path) -> None:
    runner = CliRunner()
    art = tmp_path / "artifacts"
    r = runner.invoke(_app(), ["train", "all", "--quick", "--out", str(art)])
    assert r.exit_code == 0, r.output
    encoders, packs = discover(art)
    assert set(encoders) == {"v1", "v2"} and set(packs) == {("v1", "v2")}
    v1, v2 = load_encoder(art / "v1"), load_encoder(art / "v2")
    assert v1.dim != v2.dim
    for enc in (v1, v2):
        m = enc.manifest
        assert enc.spec.shape == (1, 28, 28) and len(m["data_fingerprint"]) == 64 and "config" in m
    pack = load_compat(art / "compat-v1-v2")
    cal = pack.manifest["calibration"]
    assert set(cal) == {"reverse", "forward", "two-pass"}
    assert set(pack.manifest["predictions"]["curves"]) == {"reverse", "forward", "two-pass", "old-only"}
    for mode in cal:
        assert np.all(np.diff(cal[mode]["x"]) > 0) and np.all(np.diff(cal[mode]["y"]) >= 0)
    assert pack.order is not None and pack.manifest["order"]["rows"] == 600  # the quick recipe's order net
    before = pack.manifest["predictions"]
    order_file = art / "compat-v1-v2" / "order.pt"
    os.utime(order_file, ns=(0, 0))  # `train order` fits it again (a new file) and re-predicts
    r = runner.invoke(_app(), ["train", "order", "--quick", "--out", str(art)])
    assert r.exit_code == 0, r.output
    again = load_compat(art / "compat-v1-v2")
    assert order_file.stat().st_mtime_ns > 0
    assert again.order is not None and again.manifest["predictions"]["old_old"] == before["old_old"]
    assert "reverse: uncertainty" in r.output

    out = tmp_path / "eval"
    r = runner.invoke(
        _app(),
        ["eval", "curve", "--dataset", "digits", "--artifacts", str(art), "--out", str(out), "--dense-points", "1"],
    )
    assert r.exit_code == 0, r.output
    result = json.loads((out / "curve.json").read_text())
    assert (out / "curve.png").stat().st_size > 0 and "relative gain" in (out / "curve.md").read_text()
    names = {c["name"] for c in result["curves"]}
    assert "baseline raw merge" in names and "reverse / uncertainty" in names and "forward / oracle" in names
    assert "reverse / benefit" in names and "reverse without re-scoring / random" in names
    for c in result["curves"]:
        assert len(c["map"]) == 22
        if c["mode"] != "raw":
            assert c["map"][-1] == result["new_new"]["map"]

    # the live demo's entry point: same numbers as the harness
    x, y = load("digits", "test")
    point = E.offline_point_fn(x, y, art, mode="reverse")
    assert point.new_new == result["new_new"]["map"] and point.old_old == result["old_old"]["map"]
    assert point(np.ones(len(y), bool))[0] == result["new_new"]["map"]


def test_missing_dataset_exits_2(tmp_path: Path) -> None:
    r = CliRunner().invoke(_app(), ["train", "encoder", "v1", "--out", str(tmp_path), "--data-dir", str(tmp_path)])
    assert r.exit_code == 2
