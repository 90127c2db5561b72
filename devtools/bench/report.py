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


def _setting(r: dict[str, Any]) -> str:
    """A merge row's search setting and recall@k (one index / merged), where the row has them."""
    if "single_recall" not in r:  # results.json written before recall was measured
        return ""
    p = r.get("search_params", "default")
    return f" ({p + '; ' if p != 'default' else ''}recall {r['single_recall']:.3f} / {r['merged_recall']:.3f})"


SUMMARY_PARAMS = ("default", "nprobe=1", "nprobe=8", "nprobe=32")  # the detail table has every setting


def _rows_merge(m: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for r in m.get("rows", []):
        if r.get("search_params", "default") not in SUMMARY_PARAMS:
            continue
        out.append(
            [
                "1",
                f"merged vs one index: {r['data']}, {r['factory']}{_setting(r)}, batch {r['batch']} (p50)",
                f"{r['merged_p50_ms']:.3f} ms",
                f"{r['single_p50_ms']:.3f} ms",
                f"{r['ratio_p50']:.2f}",
                f"<= {MERGE_TARGET}",
                _ok(r["ratio_p50"], MERGE_TARGET),
            ]
        )
        if r.get("equal_recall_ratio_p50") is not None:
            out.append(
                [
                    "1",
                    f"same, at equal recall: the merge at {r['equal_recall_params']} (the cheapest merged setting "
                    f"with recall >= the one index's {r['single_recall']:.3f})",
                    f"{r['equal_recall_merged_p50_ms']:.3f} ms",
                    f"{r['single_p50_ms']:.3f} ms",
                    f"{r['equal_recall_ratio_p50']:.2f}",
                    f"<= {MERGE_TARGET}",
                    _ok(r["equal_recall_ratio_p50"], MERGE_TARGET),
                ]
            )
    return out


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


def _rows_concurrency(x: dict[str, Any]) -> list[Row]:
    """Batched vs unbatched /search throughput per client count; at 32 clients the two targets."""
    from devtools.bench.concurrency import TAIL_TARGET, THROUGHPUT_TARGET

    c = x.get("concurrency") or {}
    if "error" in c:
        return [["3", "POST /search under concurrency", f"error: {c['error']}", "", "", "", "n/a"]]
    rows = []
    for r in c.get("rows", []):
        on, off, top = r["batched"], r["unbatched"], r["clients"] == max(c["levels"])
        rows.append(
            [
                "3",
                f"POST /search q/s, {r['clients']} concurrent clients, batched vs unbatched "
                f"(p50 / p99 ms {on['p50_ms']:.1f} / {on['p99_ms']:.1f} vs {off['p50_ms']:.1f} / {off['p99_ms']:.1f})",
                f"{on['qps']:.0f} q/s",
                f"{off['qps']:.0f} q/s",
                f"{r['qps_ratio']:.2f}",
                f">= {THROUGHPUT_TARGET}" if top else "report",
                _ok(r["qps_ratio"], THROUGHPUT_TARGET, higher_is_better=True) if top else "-",
            ]
        )
        if top:
            rows.append(
                [
                    "3",
                    f"batched p99 / p50 at {r['clients']} concurrent clients",
                    f"p99 {on['p99_ms']:.1f} ms",
                    f"p50 {on['p50_ms']:.1f} ms",
                    f"{on['p99_over_p50']:.2f}",
                    f"<= {TAIL_TARGET}",
                    _ok(on["p99_over_p50"], TAIL_TARGET),
                ]
            )
    return rows


def _md_concurrency(x: dict[str, Any]) -> list[str]:
    c = x.get("concurrency") or {}
    if not c.get("rows"):
        return []
    lines = [
        "",
        f"## POST /search under concurrency ({c['repeats']} x {c['window_s']:.0f} s windows per cell, batched and "
        f"unbatched alternating; max batch {c['max_batch']}, wait {c['max_wait_ms']} ms; load average "
        f"{c['load_average_before']} before, {c['load_average_after']} after)",
        "",
        "| clients | unbatched q/s | p50 ms | p99 ms | batched q/s | p50 ms | p99 ms | mean batch | q/s ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in c["rows"]:
        on, off = r["batched"], r["unbatched"]
        lines.append(
            f"| {r['clients']} | {off['qps']:.0f} | {off['p50_ms']:.2f} | {off['p99_ms']:.2f} | {on['qps']:.0f} | "
            f"{on['p50_ms']:.2f} | {on['p99_ms']:.2f} | {_f(on['mean_batch'], '.1f')} | {r['qps_ratio']:.2f} |"
        )
    return lines


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


def _median_round(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return sorted(rounds, key=lambda r: r[key])[len(rounds) // 2]


def _rows_backfill_median(b: dict[str, Any]) -> list[Row]:
    """Each ratio from the round that gives its median (an odd number of rounds: a measured pair)."""
    rounds, targets = b["rounds"], b["targets"]
    one, two = _median_round(rounds, "one_vs_raw"), _median_round(rounds, "two_vs_one")
    where = f"{b['items']:,} items, {b['artifacts']}; median of {len(rounds)} interleaved rounds"
    return [
        [
            "4",
            f"backfill 1 worker vs raw batched encoder ({where})",
            f"{one['one_worker']['items_per_second']:.0f} items/s",
            f"{one['raw_baseline']:.0f} items/s",
            f"{one['one_vs_raw']:.2f}",
            f">= {targets['one']}",
            _ok(one["one_vs_raw"], targets["one"], True),
        ],
        [
            "4",
            f"backfill 2 workers vs 1 worker ({where})",
            f"{two['two_workers']['items_per_second']:.0f} items/s",
            f"{two['one_worker']['items_per_second']:.0f} items/s",
            f"{two['two_vs_one']:.2f}",
            f">= {targets['two']}",
            _ok(two["two_vs_one"], targets["two"], True),
        ],
    ]


def _rows_backfill_rounds(b: dict[str, Any]) -> list[Row]:
    """Interleaved rounds (bench of issue 17): the per-round ratios, the thread variant, the stage profile."""
    rounds = b["rounds"]
    per_round = ", ".join(f"{r['one_vs_raw']:.2f}" for r in rounds)
    alt = _median_round(rounds, "one_fewer_threads_vs_raw")
    rows = [
        [
            "4",
            f"variant: 1 worker with a torch thread fewer than the cores (the previous policy) vs raw (median of "
            f"{len(rounds)} rounds)",
            f"{alt['one_worker_fewer_threads']['items_per_second']:.0f} items/s",
            f"{alt['raw_baseline']:.0f} items/s",
            f"{alt['one_fewer_threads_vs_raw']:.2f}",
            "report",
            "-",
        ],
        ["4", "1 worker / raw, each round", per_round, "-", "-", "report", "-"],
    ]
    st = b.get("stages")
    if st:
        ref, new = st["reference"], st["pipeline"]
        us = [1e6 * x["seconds"] / max(x["items"], 1) for x in (new, ref)]
        rows.append(
            [
                "4",
                "serial stage profile, one batch after another (pipeline stages vs worker.backfill's)",
                f"{us[0]:.0f} us/item",
                f"{us[1]:.0f} us/item",
                f"{us[0] / us[1]:.2f}",
                "report",
                "-",
            ]
        )
    return rows


def _rows_backfill(b: dict[str, Any]) -> list[Row]:
    if "raw_encoder" not in b:
        return []
    if "rounds" in b:
        return _rows_backfill_median(b) + _rows_backfill_rounds(b)
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


def _rows_memory_scale(lg: dict[str, Any]) -> list[Row]:
    mem = lg.get("recall", {}).get("memory")
    if not mem:
        return []
    flat = mem[0]
    return [
        [
            "8",
            f"{r['index']} {r['setting']}, {lg['items']:,} items: memory per item, recall@10 (1 query)",
            f"{r['bytes_per_item']:.1f} B/item, recall@10 {r['recall']:.3f}",
            f"Flat {flat['bytes_per_item']:.1f} B/item",
            f"{r['bytes_per_item'] / flat['bytes_per_item']:.2f} of Flat's memory, {r['speedup']:.1f}x faster",
            "report",
            "-",
        ]
        for r in mem[1:]
    ]


def summary_rows(res: dict[str, Any]) -> list[Row]:
    """[#, figure, measured, baseline, ratio, target, met]"""
    s = res["sections"]
    rows = _rows_merge(s.get("1", {})) + _rows_encode(s.get("2", {})) + _rows_e2e(s.get("3", {}))
    rows += _rows_concurrency(s.get("3", {}))
    rows += _rows_backfill(s.get("4", {})) + _rows_lag(s.get("5", {})) + _rows_harness(s.get("6", {}))
    rows += _rows_memory(s.get("7", {})) + _rows_rebuild(s.get("8", {})) + _rows_recall(s.get("8", {}))
    rows += _rows_memory_scale(s.get("8", {}))
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
        "| data | index | setting | batch | queries | one p50 | merged p50 | one p95 | merged p95 | ratio p50 "
        "| ratio mean | recall@k one | recall@k merged | equal recall: merged setting | ratio p50 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in m["rows"]:
        lines.append(
            f"| {r['data']} | {r['factory']} | {r.get('search_params', 'default')} | {r['batch']} | {r['queries']} | "
            f"{r['single_p50_ms']:.3f} | {r['merged_p50_ms']:.3f} | {r['single_p95_ms']:.3f} | "
            f"{r['merged_p95_ms']:.3f} | {r['ratio_p50']:.3f} | {r['ratio_mean']:.3f} | "
            f"{_f(r.get('single_recall'), '.3f')} | {_f(r.get('merged_recall'), '.3f')} | "
            f"{r.get('equal_recall_params') or '-'} | {_f(r.get('equal_recall_ratio_p50'), '.2f')} |"
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


def _md_memory_scale(lg: dict[str, Any]) -> list[str]:
    rc = lg.get("recall", {})
    if not rc.get("memory"):
        return []
    lines = [
        "",
        f"## Memory per item at {rc['items']:,} items (d={rc['dim']}; the FAISS index as serialize_index writes "
        "it, plus a re-ranking index's exact vectors and a tombstone index's host copy; not the 1 B/item id "
        "bitmap), recall@10 vs exact, single-query p50",
        "",
        "| index | setting | build (s) | B/item | of Flat | recall@10 | p50 (ms) | speed-up vs Flat |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    flat = rc["memory"][0]["bytes_per_item"]
    for r in rc["memory"]:
        lines.append(
            f"| {r['index']} | {r['setting']} | {r['build_s']:.1f} | {r['bytes_per_item']:.1f} | "
            f"{r['bytes_per_item'] / flat:.3f} | {r['recall']:.3f} | {r['p50_ms']:.3f} | {r['speedup']:.1f} |"
        )
    return lines


def _md_scale_rows(rows: list[dict[str, Any]]) -> list[str]:
    return [
        f"| {r['fraction']:.0%} | {r['index']} | {r['setting']} | {r['bytes_per_item']:.1f} | {r['recall']:.3f} | "
        f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {_f(r['build_s'], '.1f')} |"
        for r in rows
    ]


def md_scale(sc: dict[str, Any]) -> list[str]:
    """Section 9: the merged search at gallery scale, one row per fraction, index and setting."""
    fs = sc.get("faiss", {})
    if not fs.get("rows"):
        return []
    head = "| backfilled | index | setting | B/item | recall@10 | p50 (ms) | p99 (ms) | add (s) |"
    lines = [
        "",
        f"## Merged OLD + NEW search at {fs['items']:,} items (d={fs['dim']}, {fs['clusters']:,} clusters, "
        f"{fs['queries']} single queries, both sides searched and merged, 1 thread; recall@{fs['k']} against "
        f"the exact merged top-{fs['k']}; {fs['seconds']:.0f} s, peak RSS {fs['rss_peak_gib']:.2f} GiB)",
        "",
        head,
        "|---:|---|---|---:|---:|---:|---:|---:|",
        *_md_scale_rows(fs["rows"]),
    ]
    mv = sc.get("milvus", {})
    if mv.get("rows"):
        lines += ["", f"milvus-lite at {mv['items']:,} items ({mv['queries']} queries):", "", head]
        lines += ["|---:|---|---|---:|---:|---:|---:|---:|", *_md_scale_rows(mv["rows"])]
    elif "error" in mv:
        lines += ["", f"milvus-lite: error: {mv['error']}"]
    return lines


def markdown(res: dict[str, Any]) -> str:
    lines = _header(res)
    lines += ["", "| # | figure | measured | baseline | ratio | target | met |", "|---|---|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(res)]
    s = res["sections"]
    lines += _md_stages(s.get("3", {})) + _md_concurrency(s.get("3", {}))
    lines += _md_merge(s.get("1", {})) + _md_recall(s.get("8", {}))
    lines += _md_memory_scale(s.get("8", {})) + md_scale(s.get("9", {}))
    lines += ["", "Raw figures: `results.json` beside this file."]
    return "\n".join(lines) + "\n"
