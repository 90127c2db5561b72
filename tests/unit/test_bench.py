"""Smoke test of `backfill bench` plumbing on tiny sizes (no Postgres/Redis sections): results.json and
results.md are written, every selected section reports figures beside its baseline."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from devtools.bench import BenchConfig, markdown, register, run_bench
from devtools.fakes import make_artifacts


def test_bench_quick_tiny(tmp_path: Path) -> None:
    art = make_artifacts(tmp_path / "artifacts")
    cfg = BenchConfig(
        quick=True,
        only=(1, 2, 6, 7),
        artifacts=art,
        out_dir=tmp_path / "bench",
        real_n=400,
        synth_n=2_000,
        large_n=3_000,
    )
    res = run_bench(cfg, "test")
    s = res["sections"]
    assert all("error" not in s[k] for k in ("1", "2", "6", "7")), s
    merge = s["1"]["rows"]
    assert {r["factory"] for r in merge} == {"Flat", "IVF1024,Flat"}
    assert any("embedded" in r["data"] for r in merge)  # the real-gallery rows ran with the given artifacts
    assert all(r["ratio_p50"] > 0 for r in merge)
    assert [r["batch"] for r in s["2"]["rows"]] == [1, 32]
    assert s["6"]["faiss_curve_s"] > 0 and s["6"]["dense_curve_s_extrapolated"] > 0
    assert s["7"]["items"] == 3_000 and s["7"]["ratio"] > 0
    data = json.loads((cfg.out_dir / "results.json").read_text())
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"] and data["machine"]["faiss"]
    md = (cfg.out_dir / "results.md").read_text()
    assert "| # | figure | measured | baseline | ratio | target | met |" in md
    assert md == markdown(data)


def test_bench_command_registered() -> None:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None: ...

    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    assert "--quick" in result.output


def test_bench_rejects_unknown_section(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None: ...

    result = CliRunner().invoke(app, ["bench", "--only", "10", "--out", str(tmp_path)])
    assert result.exit_code != 0
