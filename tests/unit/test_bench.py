"""Smoke test of `backfill bench` plumbing on tiny sizes (no Postgres/Redis sections): results.json and
results.md are written, every selected section reports figures beside its baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def test_merge_rows_measure_recall_against_brute_force() -> None:
    """Section 1's recall: exact (Flat) indices reproduce the brute-force answers; a one-list IVF probe over
    clustered data misses some, and the merge's recall is measured against the merge of exact halves."""
    from devtools.bench.merge import bench_merge

    (flat,) = bench_merge(600, 20, 10, 1, 16, factory="Flat")
    assert flat["single_recall"] == 1.0 and flat["merged_recall"] == 1.0
    rows = bench_merge(
        3_000, 40, 10, 1, 16, factory="IVF16,Flat", data="clustered", search_params=("nprobe=1", "nprobe=16")
    )
    by = {r["search_params"]: r for r in rows}
    assert by["nprobe=16"]["single_recall"] == 1.0 and by["nprobe=16"]["merged_recall"] == 1.0  # every list probed
    assert by["nprobe=1"]["single_recall"] < 1.0 and by["nprobe=1"]["merged_recall"] < 1.0
    for r in rows:  # equal recall: the cheapest merged setting at least as accurate as this one-index setting
        ok = [m for m in rows if m["merged_recall"] >= r["single_recall"]]
        assert r["equal_recall_params"] == min(ok, key=lambda m: m["merged_p50_ms"])["search_params"]
        assert r["equal_recall_ratio_p50"] == pytest.approx(
            min(m["merged_p50_ms"] for m in ok) / r["single_p50_ms"]  # type: ignore[operator]
        )


def test_ivf_sizing_rows() -> None:
    """The list-sizing comparison: probing every list of both halves finds the exact merged answer."""
    from devtools.bench.ivf_sizing import run

    rows = run(3_000, 10, nlist=16, d=16)
    assert len(rows) == 12
    full = [r for r in rows if r["nprobe"] == 16 and r["halves"] == "OLD IVF16 nprobe 16, NEW IVF16 nprobe 16"]
    assert len(full) == 1 and full[0]["recall_one"] == 1.0 and full[0]["recall_merged"] == 1.0


def test_merge_profile_times_each_piece_of_both_paths() -> None:
    """`python -m devtools.bench.merge_profile` plumbing: an IVF index gets its quantizer timed alone, a Flat
    one has none; every piece was timed."""
    from devtools.bench.merge_profile import profile

    ivf = profile(4_000, "IVF16,Flat", "nprobe=2", number=3)  # 4,000 >= 39 x 16: trained, not staged
    flat = profile(2_000, "Flat", "", number=3)
    assert "one: its coarse quantizer alone" in ivf and "one: its coarse quantizer alone" not in flat
    for res in (ivf, flat):
        assert all(us > 0 for us in res.values()), res
