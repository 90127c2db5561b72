"""Where a merged search's extra time goes at batch 1: each piece of the one-index path and of the merged
path timed alone (`timeit`, best of 5 repeats), for one index type.

    python -m devtools.bench.merge_profile [--items 1000000] [--factory IVF1024,Flat] [--params nprobe=1]

Clustered d=64 vectors (section 1's generator), half backfilled, one thread, single queries. The pieces
are the service's own: `VectorIndex.search` (and the FAISS call inside it), an IVF index's coarse
quantizer alone, `IndexSet.search` over both halves, a calibration of the shipped pack's form
(`models.artifacts.apply_calibration`, two knots) and `service.merge.merge_topk`, for the one index and
for the merge. The sums are printed beside each other; the difference is what the merge adds per query.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from devtools.bench.common import clustered, unit_centers
from devtools.bench.merge import _indexes, _set_params
from models.artifacts import apply_calibration
from service.merge import merge_topk

KNOTS = {"x": [0.0, 4.0], "y": [0.0, 3.6]}  # the shipped pack's form: a two-knot linear map


def _us(fn: Callable[[], Any], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def profile(n: int, factory: str, params: str, k: int = 10, d: int = 64, number: int = 2000) -> dict[str, float]:
    """Microseconds per call of each piece (see the module docstring)."""
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    centers = unit_centers(d)
    vecs, q = clustered(rng, n, d, centers), clustered(rng, 1, d, centers)
    single, pair, _ = _indexes(rng, vecs, vecs, factory)
    _set_params([single, pair.new, pair.old], params)  # type: ignore[list-item]
    d1, i1 = single.search(q, k)
    (nd, ni), old = pair.search(q, q, k)
    assert old is not None
    od, oi = old
    cal = apply_calibration(KNOTS, od)
    out = {
        "one: FAISS search": _us(lambda: single._index.search(q, k), number),
        "one: VectorIndex.search": _us(lambda: single.search(q, k), number),
        "one: merge_topk (one side)": _us(lambda: merge_topk(d1, i1, None, None, k), number),
        "merged: NEW FAISS search": _us(lambda: pair.new._index.search(q, k), number),  # type: ignore[union-attr]
        "merged: OLD FAISS search": _us(lambda: pair.old._index.search(q, k), number),  # type: ignore[union-attr]
        "merged: IndexSet.search (both, lock)": _us(lambda: pair.search(q, q, k), number),
        "merged: calibration": _us(lambda: apply_calibration(KNOTS, od), number),
        "merged: merge_topk (two sides)": _us(lambda: merge_topk(nd, ni, cal, oi, k), number),
    }
    quantizer = getattr(single._index, "quantizer", None)
    if quantizer is not None:
        nprobe = int(single._index.nprobe)  # type: ignore[attr-defined]
        out["one: its coarse quantizer alone"] = _us(lambda: quantizer.search(q, nprobe), number)
    out["one: path"] = out["one: VectorIndex.search"] + out["one: merge_topk (one side)"]
    out["merged: path"] = (
        out["merged: IndexSet.search (both, lock)"] + out["merged: calibration"] + out["merged: merge_topk (two sides)"]
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--factory", default="IVF1024,Flat")
    p.add_argument("--params", default="nprobe=1", help='FAISS search parameters, e.g. "nprobe=8"; "" for Flat')
    args = p.parse_args()
    res = profile(args.items, args.factory, args.params)
    print(f"{args.factory} {args.params or ''} over {args.items:,} items, batch 1, k 10 (us per call, best of 5)\n")
    print("| piece | us |\n|---|---:|")
    for name, us in res.items():
        print(f"| {name} | {us:.1f} |")
    one, merged = res["one: path"], res["merged: path"]
    print(f"\nmerged / one: {merged / one:.2f} (+{merged - one:.1f} us)")


if __name__ == "__main__":
    main()
