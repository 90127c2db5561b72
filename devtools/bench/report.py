"""The report: a summary row per figure (beside its baseline and target) and the markdown of results.md."""

from __future__ import annotations

from typing import Any

from devtools.bench.config import ENCODE_TARGET, LAG_P99_TARGET, MEMORY_TARGET, MERGE_TARGET, WORKER_TARGET

Row = list[str]


def _ok(value: float | None, target: float, higher_is_better: bool = False) -> str:
    if value is None:
        return "n/a"
    return "yes" if (value >= target if higher_is_better else value <= target) else "NO"


def _f(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


# ------------------------------------------------------------------------------- summary rows


def _rows_merge(m: dict[str, Any]) -> list[Row]:
    return [
        [
            "1",
            f"merged vs one index: {r['data']}, {r['factory']}, batch {r['batch']} (p50)",
            f"{r['merged_p50_ms']:.3f} ms",
            f"{r['single_p50_ms']:.3f} ms",
            f"{r['ratio_p50']:.2f}",
            f"<= {MERGE_TARGET}",
            _ok(r["ratio_p50"], MERGE_TARGET),
        ]
        for r in m.get("rows", [])
    ]


def _rows_encode(e: dict[str, Any]) -> list[Row]:
    rows = [
        [
            "2",
            f"query encoding v2+psi vs v2+v1, batch {r['batch']} (p50; {e.get('artifacts')})",
            f"{r['single_pass_p50_ms']:.3f} ms",
            f"{r['two_pass_p50_ms']:.3f} ms",
            f"{r['ratio_p50']:.2f}",
            f"<= {ENCODE_TARGET}",
            _ok(r["ratio_p50"], ENCODE_TARGET),
        ]
        for r in e.get("rows", [])
    ]
    if "rows" in e and not e["rows"]:
        rows.append(["2", "query encoding", "skipped: no artifacts", "", "", "", "n/a"])
    return rows


def _rows_e2e(x: dict[str, Any]) -> list[Row]:
    if "e2e_p50_ms" not in x:
        return []
    return [
        [
            "3",
            f"POST /search end to end vs bare FAISS searches ({x['gallery']:,} items, mid-rollout; p50)",
            f"{x['e2e_p50_ms']:.2f} ms",
            f"{x['bare_p50_ms']:.3f} ms",
            f"{x['ratio_p50']:.1f} (+{x['overhead_p50_ms']:.2f} ms)",
            "report",
            "-",
        ]
    ]


def _backfill_pair(b: dict[str, Any], one_label: str, two_label: str) -> list[Row]:
    return [
        [
            "4",
            one_label,
            f"{b['one_worker']['items_per_second']:.0f} items/s",
            f"{b['raw_encoder']['items_per_second']:.0f} items/s",
            f"{b['one_worker_vs_raw']:.2f}",
            f">= {WORKER_TARGET}",
            _ok(b["one_worker_vs_raw"], WORKER_TARGET, True),
        ],
        [
            "4",
            two_label,
            f"{b['two_workers']['items_per_second']:.0f} items/s",
            f"{b['one_worker']['items_per_second']:.0f} items/s",
            f"{b['two_vs_one_worker']:.2f}",
            "report",
            "-",
        ],
    ]


def _rows_backfill(b: dict[str, Any]) -> list[Row]:
    if "raw_encoder" not in b:
        return []
    rows = _backfill_pair(
        b,
        f"backfill 1 worker vs raw batched encoder ({b['items']:,} items, {b['artifacts']})",
        "backfill 2 workers vs 1 worker",
    )
    pv = b.get("omp_passive")
    if pv:
        rows += _backfill_pair(
            pv,
            "variant: workers with OMP_WAIT_POLICY=PASSIVE, 1 worker vs raw encoder",
            "variant: OMP_WAIT_POLICY=PASSIVE, 2 workers vs 1 worker",
        )
    return rows


def _rows_lag(lag: dict[str, Any]) -> list[Row]:
    rows = []
    for mode, label in (("event", "with Redis event"), ("poll", "polling only")):
        if mode in lag:
            r = lag[mode]
            rows.append(
                [
                    "5",
                    f"ingestion lag commit -> searchable, {label} ({r['samples']} commits of "
                    f"{lag['rows_per_commit']} rows)",
                    f"p99 {r['p99_s'] * 1000:.0f} ms",
                    f"p50 {r['p50_s'] * 1000:.0f} ms",
                    "-",
                    "p99 <= 1 s",
                    _ok(r["p99_s"], LAG_P99_TARGET),
                ]
            )
    return rows


def _rows_harness(h: dict[str, Any]) -> list[Row]:
    if "faiss_curve_s" not in h:
        return []
    return [
        [
            "6",
            f"offline curve ({h['n']:,} items, 22 points) FAISS top-k vs dense matrix",
            f"{h['faiss_curve_s']:.1f} s",
            f"{h['dense_curve_s_extrapolated']:.1f} s (extrapolated)",
            f"{h['speedup']:.1f}x faster",
            "report",
            "-",
        ]
    ]


def _rows_memory(mem: dict[str, Any]) -> list[Row]:
    if "ratio" not in mem:
        return []
    return [
        [
            "7",
            f"API index memory, {mem['items']:,} x d={mem['dim']} (RSS growth, fresh process)",
            f"{mem['bytes_per_item']:.0f} B/item",
            f"{mem['raw_bytes'] / mem['items']:.0f} B/item raw",
            f"{mem['ratio']:.2f}",
            f"<= {MEMORY_TARGET}",
            _ok(mem["ratio"], MEMORY_TARGET),
        ]
    ]


def _rows_rebuild(lg: dict[str, Any]) -> list[Row]:
    if "rebuild" not in lg:
        return []
    rb = lg["rebuild"]
    return [
        [
            "8",
            f"start-up rebuild from Postgres, {lg['items']:,} rows (Flat)",
            f"{rb['seconds']:.1f} s",
            f"COPY load {lg['copy']['copy_seconds']:.1f} s",
            f"{rb['items_per_second']:.0f} rows/s",
            "report",
            "-",
        ],
        [
            "7/8",
            "API process memory after that rebuild (RSS growth)",
            f"{rb['memory_ratio'] * 256:.0f} B/item" if lg["dim"] == 64 else "-",
            "256 B/item raw",
            f"{rb['memory_ratio']:.2f}",
            f"<= {MEMORY_TARGET}",
            _ok(rb["memory_ratio"], MEMORY_TARGET),
        ],
    ]


def _rows_recall(lg: dict[str, Any]) -> list[Row]:
    if "recall" not in lg:
        return []
    return [
        [
            "8",
            f"{r['index']} {r['setting']} vs Flat, {lg['items']:,} items (1 query)",
            f"recall@10 {r['recall']:.3f}",
            f"Flat {lg['recall']['rows'][0]['p50_ms']:.2f} ms",
            f"{r['speedup']:.1f}x faster ({r['p50_ms']:.2f} ms)",
            "report",
            "-",
        ]
        for r in lg["recall"]["rows"][1:]
    ]


def summary_rows(res: dict[str, Any]) -> list[Row]:
    """[#, figure, measured, baseline, ratio, target, met]"""
    s = res["sections"]
    rows = _rows_merge(s.get("1", {})) + _rows_encode(s.get("2", {})) + _rows_e2e(s.get("3", {}))
    rows += _rows_backfill(s.get("4", {})) + _rows_lag(s.get("5", {})) + _rows_harness(s.get("6", {}))
    rows += _rows_memory(s.get("7", {})) + _rows_rebuild(s.get("8", {})) + _rows_recall(s.get("8", {}))
    for key, sec in s.items():
        if "skipped" in sec or "error" in sec:
            rows.append([key, "section", sec.get("skipped") or f"error: {sec['error']}", "", "", "", "n/a"])
    return rows


# ----------------------------------------------------------------------------------- markdown


def _header(res: dict[str, Any]) -> list[str]:
    mc = res["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{res['command']}` ({'quick sizes' if res['quick'] else 'full sizes'}), {res['started']}, "
        f"{res['seconds']:.0f} s.",
        "",
        f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['memory_gib']} GiB, {mc['device']}; torch {mc['torch']}, "
        f"faiss {mc['faiss']}, Python {mc['python']}; load average at start {mc['load_average_at_start']}. "
        f"Search timings use {res['threads']} FAISS/torch thread(s); each figure is measured beside its "
        "baseline in the same run (interleaved where both are single calls).",
    ]
    runs: dict[tuple[str, str], list[str]] = {}
    for key, sec in res["sections"].items():
        run = sec.get("run") or {"started": res["started"], "command": res["command"]}
        runs.setdefault((run["command"], run["started"]), []).append(key)
    if len(runs) > 1:
        lines += ["", "This file gathers sections measured by more than one run (`--update`):"]
        lines += [f"- sections {', '.join(keys)}: `{c}` of {t}" for (c, t), keys in runs.items()]
    return lines


def _md_stages(x: dict[str, Any]) -> list[str]:
    if "stage_mean_ms" not in x:
        return []
    st = x["stage_mean_ms"]
    return [
        "",
        f"## /search by stage (means over {x['queries']} requests, ms; {x['layout']})",
        "",
        "| client wall | HTTP + framework | handler total | decode | encode | search | merge | bare FAISS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {_f(st.get('client_wall'))} | {_f(st.get('http_and_framework'))} | {_f(st.get('total'))} | "
        f"{_f(st.get('decode'))} | {_f(st.get('encode'))} | {_f(st.get('search'))} | {_f(st.get('merge'))} | "
        f"{_f(x['bare_mean_ms'])} |",
    ]


def _md_merge(m: dict[str, Any]) -> list[str]:
    if not m.get("rows"):
        return []
    lines = [
        "",
        "## Merged search detail (ms)",
        "",
        "| data | index | batch | queries | one p50 | merged p50 | one p95 | merged p95 | ratio p50 | ratio mean |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in m["rows"]:
        lines.append(
            f"| {r['data']} | {r['factory']} | {r['batch']} | {r['queries']} | {r['single_p50_ms']:.3f} | "
            f"{r['merged_p50_ms']:.3f} | {r['single_p95_ms']:.3f} | {r['merged_p95_ms']:.3f} | "
            f"{r['ratio_p50']:.3f} | {r['ratio_mean']:.3f} |"
        )
    return lines + [f"- {n}" for n in m.get("notes", [])]


def _md_recall(lg: dict[str, Any]) -> list[str]:
    if "recall" not in lg:
        return []
    rc = lg["recall"]
    lines = [
        "",
        f"## ANN indices at {rc['items']:,} items (d={rc['dim']}, {rc['data']}, {rc['queries']} "
        "single queries, 1 thread; builds use all cores)",
        "",
        "| index | setting | build (s) | p50 (ms) | recall@10 | speed-up vs Flat |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rc["rows"]:
        lines.append(
            f"| {r['index']} | {r['setting']} | {r['build_s']:.1f} | {r['p50_ms']:.3f} | "
            f"{r['recall']:.3f} | {r['speedup']:.1f} |"
        )
    return lines


def markdown(res: dict[str, Any]) -> str:
    lines = _header(res)
    lines += ["", "| # | figure | measured | baseline | ratio | target | met |", "|---|---|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(res)]
    s = res["sections"]
    lines += _md_stages(s.get("3", {})) + _md_merge(s.get("1", {})) + _md_recall(s.get("8", {}))
    lines += ["", "Raw figures: `results.json` beside this file."]
    return "\n".join(lines) + "\n"
