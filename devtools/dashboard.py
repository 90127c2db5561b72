"""The Grafana dashboard (deploy/grafana/dashboards/backfill.json) without Grafana: its PromQL expressions,
fetched from a Prometheus server over a time range, and rendered into one PNG laid out like the dashboard.

`make deploy-test` (devtools/deploy_check.py) fetches and renders the data of its rollout; the README's
picture is one such render. Re-render a saved fetch with
`python -m devtools.dashboard runs/deploy/dashboard.json runs/deploy/dashboard.png`.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from service.config import REPO_ROOT

DASHBOARD_FILE = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "backfill.json"
# Grafana's global variables, replaced by what Prometheus's HTTP API accepts. The checks use a 1m rate window (data
# exists once two scrapes fell into it); the rendering uses what Grafana itself computes for a range of a few
# minutes with the datasource's 5 s scrape interval: $__rate_interval = 4 x 5 s = 20s.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
RENDER_RATE_INTERVAL = "20s"
# Grafana's grid: 24 columns; one row unit is 30 px against about 75 px for a column on a wide screen.
GRID_COLUMNS, ROW_TO_COLUMN = 24, 0.4


def dashboard(path: Path = DASHBOARD_FILE) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


def dashboard_expressions(board: dict[str, Any] | None = None) -> list[str]:
    """Every PromQL expression of the dashboard, as Grafana stores it."""
    exprs = []
    for p in iter_panels((board or dashboard())["panels"]):
        for t in p.get("targets", []):
            if t.get("expr"):
                exprs.append(t["expr"])
    return exprs


def to_promql(expr: str, rate_interval: str | None = None) -> str:
    """A dashboard expression with Grafana's global variables replaced, for Prometheus's HTTP API."""
    values = GRAFANA_VARS | ({"$__rate_interval": rate_interval} if rate_interval else {})
    for var, value in values.items():
        expr = expr.replace(var, value)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr!r}")
    return expr


# --- fetching ----------------------------------------------------------------------------------------------
def query(prom: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """An instant query; raises on an error answer."""
    params: dict[str, Any] = {"query": expr} | ({"time": at} if at is not None else {})
    r = httpx.get(f"{prom}/api/v1/query", params=params, timeout=10.0)
    body = r.json()
    if r.status_code != 200 or body.get("status") != "success":
        raise RuntimeError(f"{expr!r}: {r.status_code} {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    """An instant query's result holds a number (not NaN, as a rate over an empty window gives)."""
    return any(math.isfinite(float(s["value"][1])) for s in result)


def has_finite_point(series: dict[str, Any]) -> bool:
    """A range query's series holds at least one number."""
    return any(math.isfinite(float(v)) for _, v in series.get("values", []))


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{prom}/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": step},
        timeout=30.0,
    )
    body = r.json()
    if r.status_code != 200 or body.get("status") != "success":
        raise RuntimeError(f"{expr!r}: {r.status_code} {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def fetch(
    prom: str, start: float, end: float, step: float = 5.0, board: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every panel of the dashboard with the range data of each of its targets (a JSON-able dict)."""
    panels = []
    for p in iter_panels((board or dashboard())["panels"]):
        defaults = p.get("fieldConfig", {}).get("defaults", {})
        entry: dict[str, Any] = {
            "title": p.get("title", ""),
            "type": p.get("type", ""),
            "gridPos": p.get("gridPos", {}),
            "unit": defaults.get("unit"),
            "min": defaults.get("min"),
            "max": defaults.get("max"),
            "targets": [],
        }
        for t in p.get("targets", []):
            if t.get("expr"):
                series = query_range(prom, to_promql(t["expr"], RENDER_RATE_INTERVAL), start, end, step)
                entry["targets"].append({"expr": t["expr"], "legend": t.get("legendFormat", ""), "series": series})
        panels.append(entry)
    return {"start": start, "end": end, "step": step, "panels": panels}


# --- rendering ---------------------------------------------------------------------------------------------
def legend(fmt: str, metric: dict[str, str], expr: str) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' label value."""
    if not fmt:
        inner = ", ".join(f"{k}={v}" for k, v in sorted(metric.items()) if k != "__name__")
        return inner or expr[:40]
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)


def format_value(v: float, unit: str | None) -> str:
    if not math.isfinite(v):
        return "-"
    if unit == "percentunit":
        return f"{100 * v:.1f}%"
    if unit == "s":
        return f"{v * 1000:.1f} ms" if 0 < abs(v) < 1 else f"{v:.0f} s"
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _points(series: dict[str, Any], start: float) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for t, v in series.get("values", []):
        y = float(v)
        if math.isfinite(y):
            xs.append((float(t) - start) / 60.0)
            ys.append(y)
    return xs, ys


def _last(series: dict[str, Any]) -> float:
    values = [float(v) for _, v in series.get("values", []) if math.isfinite(float(v))]
    return values[-1] if values else float("nan")


def _current(panel: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(target, series) pairs still present at the end of the range: what a stat or table panel shows now."""
    stamps = [float(s["values"][-1][0]) for t in panel["targets"] for s in t["series"] if s.get("values")]
    end = max(stamps, default=0.0)
    for target in panel["targets"]:
        for s in target["series"]:
            if s.get("values") and float(s["values"][-1][0]) >= end:
                yield target, s


def _draw_timeseries(ax: Any, panel: dict[str, Any], start: float, end: float) -> None:
    unit = panel.get("unit")
    scale = 1000.0 if unit == "s" else 100.0 if unit == "percentunit" else 1.0
    drawn = 0
    for target in panel["targets"]:
        for s in target["series"]:
            xs, ys = _points(s, start)
            if xs:
                label = legend(target["legend"], s.get("metric", {}), target["expr"])
                ax.plot(xs, [y * scale for y in ys], linewidth=1.4, label=label[:48])
                drawn += 1
    ylabel = {"s": "ms", "percentunit": "%", "reqps": "req/s", "ops": "ops/s"}.get(unit or "", "")
    ax.set_ylabel(ylabel, fontsize=7)
    ax.set_xlabel("minutes", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.set_xlim(0, (end - start) / 60.0)
    if panel.get("min") is not None and panel.get("max") is not None:
        ax.set_ylim(panel["min"] * scale, panel["max"] * scale * 1.02)
    if drawn:
        ax.legend(fontsize=6, loc="best", ncol=2 if drawn > 4 else 1, framealpha=0.7)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#b00")


def _draw_stat(ax: Any, panel: dict[str, Any]) -> None:
    """Stat, gauge and table panels: the last value of every series, one line each."""
    lines = []
    current = sorted(_current(panel), key=lambda ts: -_last(ts[1]) if math.isfinite(_last(ts[1])) else math.inf)
    for target, s in current:
        metric = s.get("metric", {})
        if panel["type"] == "table":
            labels = ", ".join(f"{k}={v}" for k, v in sorted(metric.items()) if k != "__name__")
            lines.append(f"{labels}: {format_value(_last(s), None)}")
        else:
            name = legend(target["legend"], metric, target["expr"])
            lines.append(f"{format_value(_last(s), panel.get('unit'))}  {name}")
    ax.set_axis_off()
    size = 15 if len(lines) <= 2 else 11 if len(lines) <= 4 else 8
    ax.text(0.5, 0.45, "\n".join(lines) or "no data", ha="center", va="center", fontsize=size,
            transform=ax.transAxes, color="#135" if lines else "#b00", wrap=True)  # fmt: skip


def render(data: dict[str, Any], out: Path, title: str = "") -> Path:
    """One PNG with every panel where the dashboard's grid puts it (gridPos), rows as section headings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = data["panels"]
    rows = max(p["gridPos"].get("y", 0) + p["gridPos"].get("h", 1) for p in panels)
    width = 20.0
    height = width / GRID_COLUMNS * ROW_TO_COLUMN * rows + 0.6
    fig = plt.figure(figsize=(width, height))
    top = 1 - 0.6 / height  # room for the title

    def box(g: dict[str, Any], pad_x: float, pad_top: float, pad_bottom: float) -> tuple[float, float, float, float]:
        x0, w = g.get("x", 0) / GRID_COLUMNS, g.get("w", GRID_COLUMNS) / GRID_COLUMNS
        y0, h = g.get("y", 0) / rows * top, g.get("h", 1) / rows * top
        return (x0 + pad_x, top - y0 - h + pad_bottom, w - 2 * pad_x, h - pad_top - pad_bottom)

    for p in panels:
        g = p["gridPos"]
        if p["type"] == "row":
            x, y, _, _ = box(g, 0.004, 0, 0)
            fig.text(x, y + 0.2 / height, p["title"], fontsize=12, fontweight="bold", color="#333")
            continue
        timeseries = p["type"] == "timeseries"
        ax = fig.add_axes(
            box(g, 0.022 if timeseries else 0.006, 0.55 / height, 0.45 / height if timeseries else 0.1 / height)
        )
        ax.set_title(p["title"], fontsize=9, loc="left")
        if timeseries:
            _draw_timeseries(ax, p, data["start"], data["end"])
        else:
            _draw_stat(ax, p)
    when = datetime.fromtimestamp(data["start"], UTC).strftime("%Y-%m-%d %H:%M UTC")
    minutes = (data["end"] - data["start"]) / 60
    fig.suptitle(title or f"Online backfill dashboard, {minutes:.1f} minutes from {when}", fontsize=13, y=0.998)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m devtools.dashboard DATA.json OUT.png [TITLE]", file=sys.stderr)
        return 2
    data = json.loads(Path(argv[0]).read_text())
    render(data, Path(argv[1]), argv[2] if len(argv) == 3 else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
