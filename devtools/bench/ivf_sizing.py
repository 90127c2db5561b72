"""Merged IVF search with each half's lists sized by what it holds, against the same lists on both halves.

    python -m devtools.bench.ivf_sizing [--items 1000000] [--queries 300]

Clustered d=64 vectors, half backfilled, one thread, single queries. The one index is IVF<nlist> at nprobe p.
Three merged constructions, each half trained on its own items: both halves IVF<nlist> at nprobe p (what the
service does); both IVF<nlist/2> at nprobe p/2 (the same fraction of each half probed, the same number of
centroids and list visits as the one index); OLD IVF<nlist> at p and NEW IVF<nlist/4> at p/4 (a NEW side
trained small, early in a rollout). Each row: p50 of the merge over the one index's (interleaved) and the
recall@k of both against their exact answers over the same items.
"""

from __future__ import annotations

import argparse
import statistics

import faiss
import numpy as np

from devtools.bench.common import clustered, recall_at, time_pair, unit_centers
from devtools.bench.merge import _exact, _set_params
from service.index import IndexSet, Layout, VectorIndex
from service.merge import Hit, merge_topk

LAYOUT = Layout(serving="v1", rollout_id=1, from_model="v1", to_model="v2", mode="reverse")


def run(n: int, n_queries: int, nlist: int = 1024, k: int = 10, d: int = 64, seed: int = 0) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    centers = unit_centers(d)
    vecs, queries = clustered(rng, n, d, centers), clustered(rng, n_queries, d, centers)
    ids = np.arange(n, dtype=np.int64)
    in_new = np.zeros(n, dtype=bool)
    in_new[rng.permutation(n)[: n // 2]] = True
    single = VectorIndex(d, f"IVF{nlist},Flat")
    single.add(ids, vecs)
    pairs: dict[tuple[int, int], IndexSet] = {}
    for lists_old, lists_new in ((nlist, nlist), (nlist // 2, nlist // 2), (nlist, nlist // 4)):
        pair = IndexSet(LAYOUT, new=VectorIndex(d, f"IVF{lists_new},Flat"), old=VectorIndex(d, f"IVF{lists_old},Flat"))
        pair.apply(to_old=(ids[~in_new], vecs[~in_new]))
        pair.apply(to_new=(ids[in_new], vecs[in_new]))
        pairs[(lists_old, lists_new)] = pair
    truth_one = _exact(vecs, ids, queries, k)[1]
    nd, ni = _exact(vecs[in_new], ids[in_new], queries, k)
    od, oi = _exact(vecs[~in_new], ids[~in_new], queries, k)
    truth_merged = np.array([[h.item_id for h in row] for row in merge_topk(nd, ni, od, oi, k)])

    def one(i: int) -> list[list[Hit]]:
        d_, i_ = single.search(queries[i : i + 1], k)
        return merge_topk(d_, i_, None, None, k)

    rows: list[dict[str, object]] = []
    for p in (4, 8, 16, 32):
        _set_params([single], f"nprobe={p}")
        for (lists_old, lists_new), pair in pairs.items():
            p_old, p_new = max(1, p * lists_old // nlist), max(1, p * lists_new // nlist)
            assert isinstance(pair.old, VectorIndex) and isinstance(pair.new, VectorIndex)
            _set_params([pair.old], f"nprobe={p_old}")
            _set_params([pair.new], f"nprobe={p_new}")

            def merged(i: int, pair: IndexSet = pair) -> list[list[Hit]]:
                (a, b), old = pair.search(queries[i : i + 1], queries[i : i + 1], k)
                assert old is not None
                return merge_topk(a, b, old[0], old[1], k)

            t_one, t_merged = time_pair(one, merged, n_queries)
            rows.append(
                {
                    "nprobe": p,
                    "halves": f"OLD IVF{lists_old} nprobe {p_old}, NEW IVF{lists_new} nprobe {p_new}",
                    "one_p50_ms": statistics.median(t_one) * 1e3,
                    "merged_p50_ms": statistics.median(t_merged) * 1e3,
                    "ratio_p50": statistics.median(t_merged) / statistics.median(t_one),
                    "recall_one": recall_at([[h.item_id for h in one(i)[0]] for i in range(n_queries)], truth_one, k),
                    "recall_merged": recall_at(
                        [[h.item_id for h in merged(i)[0]] for i in range(n_queries)], truth_merged, k
                    ),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    print(f"{args.items:,} clustered d=64 items, half backfilled, {args.queries} single queries, 1 thread")
    print("| one index nprobe | merged halves | one p50 ms | merged p50 ms | ratio p50 | recall@10 one | merged |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in run(args.items, args.queries):
        print(
            f"| {r['nprobe']} | {r['halves']} | {r['one_p50_ms']:.3f} | {r['merged_p50_ms']:.3f} | "
            f"{r['ratio_p50']:.2f} | {r['recall_one']:.3f} | {r['recall_merged']:.3f} |"
        )


if __name__ == "__main__":
    main()
