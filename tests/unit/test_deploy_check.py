"""The deploy test's own parts, without Docker: the dashboard renderer (devtools/dashboard.py), the checks of
devtools/deploy_check.py against fake answers, and scripts/deploy-test.sh's place in CI and the README."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devtools import dashboard as dash
from devtools import deploy_check

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "deploy-test.sh"


# --- the dashboard renderer -----------------------------------------------------------------------------------
def test_legend_follows_grafana_legend_format() -> None:
    assert dash.legend("{{stage}} p95", {"stage": "encode"}, "x") == "encode p95"
    assert dash.legend("{{ model }} -> {{missing}}", {"model": "v2"}, "x") == "v2 -> "
    assert dash.legend("", {"__name__": "m", "job": "api"}, "m") == "job=api"


def test_to_promql_replaces_grafana_variables() -> None:
    expr = 'rate(x_total{job="api"}[$__rate_interval])'
    assert dash.to_promql(expr) == 'rate(x_total{job="api"}[1m])'
    assert dash.to_promql(expr, "20s") == 'rate(x_total{job="api"}[20s])'
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        dash.to_promql("rate(x[$__unknown])")


def test_format_value_units() -> None:
    assert dash.format_value(0.5, "percentunit") == "50.0%"
    assert dash.format_value(0.0123, "s") == "12.3 ms"
    assert dash.format_value(0.0, "s") == "0 s"
    assert dash.format_value(300.0, "short") == "300"
    assert dash.format_value(float("nan"), None) == "-"


def _series(metric: dict[str, str], values: list[tuple[float, float]]) -> dict[str, Any]:
    return {"metric": metric, "values": [[t, str(v)] for t, v in values]}


def _data() -> dict[str, Any]:
    t = [1000.0 + 5 * i for i in range(13)]
    return {
        "start": t[0],
        "end": t[-1],
        "step": 5.0,
        "panels": [
            {"title": "Rollout", "type": "row", "gridPos": {"x": 0, "y": 0, "w": 24, "h": 1}, "targets": []},
            {
                "title": "Progress",
                "type": "gauge",
                "gridPos": {"x": 0, "y": 1, "w": 8, "h": 6},
                "unit": "percentunit",
                "targets": [
                    {"expr": "p", "legend": "done", "series": [_series({}, [(x, i / 12) for i, x in enumerate(t)])]}
                ],
            },
            {
                "title": "Serving",
                "type": "table",
                "gridPos": {"x": 8, "y": 1, "w": 16, "h": 6},
                "targets": [
                    {
                        "expr": "s",
                        "legend": "",
                        "series": [
                            _series({"model": "v1"}, [(x, 1.0) for x in t[:5]]),  # gone before the end
                            _series({"model": "v2"}, [(x, 1.0) for x in t[5:]]),
                        ],
                    }
                ],
            },
            {
                "title": "Rate",
                "type": "timeseries",
                "gridPos": {"x": 0, "y": 7, "w": 12, "h": 8},
                "unit": "short",
                "targets": [{"expr": "r", "legend": "{{w}}", "series": [_series({"w": "a"}, [(x, 3.0) for x in t])]}],
            },
            {"title": "Empty", "type": "timeseries", "gridPos": {"x": 12, "y": 7, "w": 12, "h": 8}, "targets": []},
        ],
    }


def test_current_series_are_those_present_at_the_end() -> None:
    serving = _data()["panels"][2]
    assert [s["metric"] for _, s in dash._current(serving)] == [{"model": "v2"}]


def test_render_draws_every_panel(tmp_path: Path) -> None:
    import matplotlib.image

    out = dash.render(_data(), tmp_path / "d.png")
    img = matplotlib.image.imread(out)
    assert img.shape[1] > 1000 and img.shape[0] > 300
    # not a blank page: the line, the texts and the axes put many distinct colours on it
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 20
    assert dash.main([str(tmp_path / "missing.json")]) == 2


# --- the checks, against fake answers -------------------------------------------------------------------------
class FakeStack:
    def __init__(self, workers: list[str]) -> None:
        self.workers = workers
        self.prom = "http://prometheus.invalid"

        class Http:
            def get(self, path: str) -> None:
                return None

        self.http = Http()

    def targets(self) -> dict[str, list[str]]:
        return {"api": ["api:8000"], "worker": self.workers}


def test_check_scrapes_needs_every_worker() -> None:
    stack: Any = FakeStack(["10.0.0.4:9101", "10.0.0.5:9101"])
    assert deploy_check.check_scrapes(stack, 2, timeout=1)["worker"] == stack.workers
    with pytest.raises(deploy_check.CheckFailed, match="2 workers"):
        deploy_check.check_scrapes(FakeStack(["10.0.0.4:9101"]), 2, timeout=0.2)  # type: ignore[arg-type]


def test_check_dashboard_names_the_expression_without_data(monkeypatch: pytest.MonkeyPatch) -> None:
    exprs = dash.dashboard_expressions()
    silent = exprs[3]

    def fake_range(prom: str, promql: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        if promql == dash.to_promql(silent):
            return [_series({}, [(start, float("nan"))])]  # a rate over an empty window
        return [_series({}, [(start, 1.0)])]

    monkeypatch.setattr(dash, "query_range", fake_range)
    with pytest.raises(deploy_check.CheckFailed) as failure:
        deploy_check.check_dashboard(FakeStack([]), 1, since=0.0, timeout=0.3)  # type: ignore[arg-type]
    assert silent in str(failure.value)
    assert all(e == silent or e not in str(failure.value).split("without data:")[1] for e in exprs)

    monkeypatch.setattr(dash, "query_range", lambda *a: [_series({}, [(0.0, 1.0)])])
    assert deploy_check.check_dashboard(FakeStack([]), 1, since=0.0, timeout=1) == len(set(exprs))


# --- the script, CI and the README -------------------------------------------------------------------------------
def test_deploy_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_ci_runs_the_deploy_test_after_the_suite() -> None:
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip().startswith("make ")]
    assert lines == ["make test", "make deploy-test"]
    assert re.search(r"^deploy-test: .*\n\tbash scripts/deploy-test.sh$", (REPO / "Makefile").read_text(), re.M)


def test_readme_full_stack_commands_are_the_deploy_tests() -> None:
    """The README's "Run the full stack" commands are the ones scripts/deploy-test.sh runs (with `compose` for
    `docker compose` / `docker-compose`), and the README names the deploy test as its third command."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Run the full stack", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    script = SCRIPT.read_text()
    for var in ("BACKFILL_OPERATOR_TOKEN", "POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        assert f"export {var}=" in block, var
        assert var in script, var
    readme_cmds = re.findall(r"^docker compose (build|up -d --scale worker=2)\b", block, re.M)
    assert readme_cmds == ["build", "up -d --scale worker=2"]
    for cmd in readme_cmds:
        assert re.search(rf"^\s*compose {re.escape(cmd)}\b", script, re.M), cmd
    assert "make deploy-test" in readme.split("## Three commands", 1)[1].split("```", 2)[1]
