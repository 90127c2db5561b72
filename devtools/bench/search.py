"""Query-path benchmark on its own (sections 1 and 2 with their own sizes), measured side by side in one run.

1. Merged search over OLD + NEW halves (two FAISS searches, calibration, distance-rank merge) vs one
   index holding every item: same gallery, same queries, interleaved. Target: latency ratio <= 1.15.
2. Query encoding single-pass (v2 + psi) vs two-pass (v2 + v1) with the shipped artifacts. Target: cost
   ratio <= 0.6. Skipped (and said so) when artifacts/{v1,v2,compat-v1-v2} are missing.

Prints a markdown table and writes runs/bench/search.json.

    .venv/bin/python -m devtools.bench.search [--sizes 10000 100000] [--queries 500]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

from devtools.bench.config import REPO
from devtools.bench.encode import bench_encode
from devtools.bench.merge import bench_merge


def _print_tables(args: argparse.Namespace, merge_rows: list[dict[str, Any]], enc_rows: list[dict[str, Any]]) -> None:
    print(f"## Merged OLD+NEW search vs one index (Flat, d=64, k={args.k}, {args.threads} thread(s))\n")
    print("Target: ratio <= 1.15.\n")
    print("| items | batch | one p50 (ms) | merged p50 (ms) | one p95 | merged p95 | ratio p50 | ratio mean |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in merge_rows:
        print(
            f"| {r['items']:,} | {r['batch']} | {r['single_p50_ms']:.3f} | {r['merged_p50_ms']:.3f} | "
            f"{r['single_p95_ms']:.3f} | {r['merged_p95_ms']:.3f} | {r['ratio_p50']:.3f} | "
            f"{r['ratio_mean']:.3f} |"
        )
    print("\n## Query encoding: single pass (v2 + psi) vs two passes (v2 + v1) (target ratio <= 0.6)\n")
    if not enc_rows:
        print(f"skipped: shipped artifacts not found under {args.artifacts} (v1, v2, compat-v1-v2)")
    else:
        print("| batch | v2 + psi p50 (ms) | v2 + v1 p50 (ms) | ratio p50 | ratio mean |")
        print("|---:|---:|---:|---:|---:|")
        for r in enc_rows:
            print(
                f"| {r['batch']} | {r['single_pass_p50_ms']:.3f} | {r['two_pass_p50_ms']:.3f} | "
                f"{r['ratio_p50']:.3f} | {r['ratio_mean']:.3f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    ap.add_argument("--threads", type=int, default=1, help="FAISS/torch threads (1 = least noise on a shared box)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "search.json")
    args = ap.parse_args()
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)

    merge_rows: list[dict[str, Any]] = []
    for n in args.sizes:
        for batch in (1, 32):
            merge_rows += bench_merge(n, args.queries if batch == 1 else max(50, args.queries // 5), args.k, batch)
    enc_rows = [r for b in (1, 32) if (r := bench_encode(args.artifacts, 200 if b == 1 else 50, b)) is not None]
    _print_tables(args, merge_rows, enc_rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
    }
    encode_skipped = None if enc_rows else f"no artifacts under {args.artifacts}"
    doc = {"machine": machine, "merge": merge_rows, "encode": enc_rows or None, "encode_skipped": encode_skipped}
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
