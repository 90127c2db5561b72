"""Section 9: the merged OLD + NEW search at gallery scale (issue 19, build 4).

Synthetic, clustered, d = 256 (`Synth`): v1 vectors are unit vectors around random unit centres (about
`per_cluster` items per centre, noise norm 0.6, uniform noise: half the cost of Gaussian to draw), generated
chunk by chunk from a seed so nothing larger than one chunk is ever drawn twice at once. The v2 space is a known
transformation of v1: v2 = normalize(v1 (I + 0.1 G) R), R a random orthogonal matrix and G Gaussian with
N(0, 1/d) entries; the reverse query is psi(y) = y R^T, the inverse of the rotation only, so the OLD side is
searched with a query that is off by the warp, like a learned psi. Queries are gallery items plus noise.

At backfilled fractions 0, 0.5 and 1 (an item is on NEW iff its Weyl hash < the fraction), the exact merged
top-k is computed by streaming brute force (FAISS `knn` per chunk and side, then `service.merge.merge_topk`);
then each index type is built per side and measured: bytes per item, recall@k of the merged result against
the exact merged one, and the latency of one query (both sides searched and merged, one thread). FAISS
indices are built directly (not through `VectorIndex`, whose IVF staging trains on every vector held) from a
coarse quantizer and PQ trained once per space on a sample, with the coarse assignments computed once per
space and item in the exact pass (`add_core`). Each side's rows are stored in coarse-list order, so each IVF-Flat
list is filled once, at its final size, from a contiguous run of rows that is then released: a 10M run never
holds the vectors twice.
"""

from __future__ import annotations

import gc
import math
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from devtools.bench.common import recall_at, rss_bytes
from devtools.bench.config import BenchConfig

FRACTIONS = (0.0, 0.5, 1.0)
MAX_NLIST = 1024  # coarse lists: n / 64 rounded down to a power of two, at most this (see docs/scale.md)
PQ_M = 32  # sub-quantizers of 8 bits: 32 B of code per d=256 vector (8 dimensions each), 1/32 of float32
NPROBES = (8, 32)
REFINE = ((8, 4), (32, 16))  # (nprobe, k_factor): service default k_factor 4, and 16
CHUNK = 262_144
PAGE = mmap.PAGESIZE
_WEYL = np.uint64(2654435761)


def normalize(v: np.ndarray) -> np.ndarray:
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def moved(ids: np.ndarray, fraction: float) -> np.ndarray:
    """True where the item is backfilled (on NEW) at `fraction`: a Weyl hash of the id, evenly spread."""
    h = (ids.astype(np.uint64) * _WEYL) % np.uint64(2**32)
    return np.asarray(h.astype(np.float64) / 2.0**32 < fraction)


@dataclass
class Synth:
    n: int
    d: int = 256
    seed: int = 9
    chunk: int = CHUNK
    per_cluster: int = 1000
    noise: float = 0.6
    warp: float = 0.1
    centers: np.ndarray = field(init=False, repr=False)
    rot: np.ndarray = field(init=False, repr=False)
    fwd: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, 1])
        c = rng.standard_normal((max(16, self.n // self.per_cluster), self.d)).astype(np.float32)
        self.centers = normalize(c)
        r, _ = np.linalg.qr(rng.standard_normal((self.d, self.d)))
        g = rng.standard_normal((self.d, self.d)) / math.sqrt(self.d)
        self.rot = r.astype(np.float32)
        self.fwd = ((np.eye(self.d) + self.warp * g) @ r).astype(np.float32)

    @property
    def chunks(self) -> int:
        return -(-self.n // self.chunk)

    def v1(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk `c`: item ids and their v1 vectors (the same for a given seed, whatever else was drawn)."""
        lo, hi = c * self.chunk, min(self.n, (c + 1) * self.chunk)
        rng = np.random.default_rng([self.seed, 2, c])
        lab = rng.integers(0, len(self.centers), hi - lo)
        v = rng.random((hi - lo, self.d), dtype=np.float32)
        v -= 0.5
        v *= self.noise * math.sqrt(12 / self.d)
        v += self.centers[lab]
        return np.arange(lo, hi, dtype=np.int64), normalize(v)

    def v2(self, v1: np.ndarray) -> np.ndarray:
        return normalize(v1 @ self.fwd)

    def psi(self, y: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(y @ self.rot.T)

    def queries(self, m: int, seed: int = 77) -> tuple[np.ndarray, np.ndarray]:
        """(NEW query v2(q), OLD query psi(v2(q))) for `m` gallery items of chunk 0 plus noise of norm 0.3."""
        _, v = self.v1(0)
        rng = np.random.default_rng([self.seed, 3, seed])
        pick = rng.choice(len(v), min(m, len(v)), replace=False)
        q1 = normalize(v[pick] + rng.standard_normal((len(pick), self.d)).astype(np.float32) * (0.3 / self.d**0.5))
        q2 = self.v2(q1)
        return q2, self.psi(q2)


def n_lists(n: int) -> int:
    return int(max(16, min(MAX_NLIST, 2 ** int(math.log2(max(n // 64, 1))))))


# ------------------------------------------------------------------------------------- the exact pass


class TopK:
    """Running k smallest (distance, item id) per query."""

    def __init__(self, m: int, k: int) -> None:
        self.k = k
        self.d = np.full((m, k), np.inf, dtype=np.float32)
        self.i = np.full((m, k), -1, dtype=np.int64)

    def update(self, d: np.ndarray, i: np.ndarray) -> None:
        dd = np.concatenate([self.d, d], axis=1)
        ii = np.concatenate([self.i, i], axis=1)
        o = np.argsort(dd, axis=1, kind="stable")[:, : self.k]
        self.d, self.i = np.take_along_axis(dd, o, 1), np.take_along_axis(ii, o, 1)


def knn_items(q: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of `x` (squared L2), as item ids (-1 / inf where x has fewer than k rows)."""
    import faiss

    d, p = faiss.knn(q, x, k)
    ok = p >= 0
    return np.where(ok, d, np.inf).astype(np.float32), np.where(ok, ids[np.clip(p, 0, None)], -1)


def merged_ids(new: tuple[np.ndarray, np.ndarray] | None, old: tuple[np.ndarray, np.ndarray] | None, k: int) -> Any:
    """The service's merge (`merge_topk`) of two sides' (distances, ids): per query the k item ids."""
    from service.merge import merge_topk

    m = (new or old or (np.zeros((0, 0)),))[0].shape[0]
    nd, ni = new if new is not None else (np.zeros((m, 0), np.float32), np.zeros((m, 0), np.int64))
    hits = merge_topk(nd, ni, None if old is None else old[0], None if old is None else old[1], k)
    out = np.full((len(hits), k), -1, dtype=np.int64)
    for r, h in enumerate(hits):
        out[r, : len(h)] = [x.item_id for x in h]
    return out


@dataclass
class Space:
    """One space's trained (empty) IVF-PQ, its coarse centroids and every item's list in it."""

    pq: Any
    centroids: np.ndarray
    assign: np.ndarray
    train_s: float
    assign_s: float = 0.0


def train_space(x: np.ndarray, n: int) -> Space:
    import faiss

    t0 = time.perf_counter()
    d, nlist = x.shape[1], n_lists(n)
    ix: Any = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, PQ_M, 8)
    ix.do_polysemous_training = False
    ix.cp.niter = 10
    ix.train(x)
    quant: Any = faiss.downcast_index(ix.quantizer)
    cent = faiss.rev_swig_ptr(quant.get_xb(), nlist * d).reshape(nlist, d).copy()
    return Space(ix, cent, np.zeros(n, dtype=np.int32), time.perf_counter() - t0)


def train_spaces(syn: Synth) -> dict[str, Space]:
    """Train each space's coarse quantizer and PQ on one sample (64 points per list, at least 2**16 rows)."""
    rows = min(syn.n, max(2**16, 64 * n_lists(syn.n)))
    parts, got, c = [], 0, 0
    while got < rows:
        _, v = syn.v1(c)
        parts.append(v[: rows - got])
        got += len(parts[-1])
        c += 1
    x1 = np.concatenate(parts)
    return {"old": train_space(x1, syn.n), "new": train_space(syn.v2(x1), syn.n)}


@dataclass
class Truth:
    merged: dict[float, np.ndarray]
    seconds: float


def exact_pass(syn: Synth, qn: np.ndarray, qo: np.ndarray, k: int, spaces: dict[str, Space] | None) -> Truth:
    """Stream every chunk once: the exact per-side top-k at each fraction (FAISS `knn`, brute force), merged
    by `merge_topk`; and, with `spaces`, each item's coarse list in both spaces."""
    import faiss

    t0 = time.perf_counter()
    tops = {f: {"new": TopK(len(qn), k), "old": TopK(len(qn), k)} for f in FRACTIONS}
    quant = {s: faiss.IndexFlatL2(sp.centroids.shape[1]) for s, sp in (spaces or {}).items()}
    for s, q in quant.items():
        q.add(spaces[s].centroids)  # type: ignore[index]
    for c in range(syn.chunks):
        ids, x1 = syn.v1(c)
        x2 = syn.v2(x1.copy())
        if spaces:
            for s, x in (("old", x1), ("new", x2)):
                t1 = time.perf_counter()
                spaces[s].assign[ids] = quant[s].assign(x, 1).ravel()
                spaces[s].assign_s += time.perf_counter() - t1
        for f in FRACTIONS:
            mv = moved(ids, f)
            if mv.any():
                tops[f]["new"].update(*knn_items(qn, x2[mv], ids[mv], k))
            if not mv.all():
                tops[f]["old"].update(*knn_items(qo, x1[~mv], ids[~mv], k))
    merged = {}
    for f in FRACTIONS:
        t = tops[f]
        merged[f] = merged_ids(
            (t["new"].d, t["new"].i) if f > 0 else None, (t["old"].d, t["old"].i) if f < 1 else None, k
        )
    return Truth(merged, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------- one side's data


class Side:
    """One side at one fraction: its items' vectors (anonymous memory, released page by page once copied
    elsewhere), item ids by row, and the rows' coarse lists."""

    def __init__(self, n: int, d: int) -> None:
        self.n, self.d = n, d
        # private: MADV_DONTNEED frees a private anonymous page; a shared one (mmap's default) keeps it
        self._buf = mmap.mmap(-1, max(n * d * 4, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.x = np.frombuffer(self._buf, dtype=np.float32, count=n * d).reshape(n, d)
        self.ids = np.zeros(n, dtype=np.int64)
        self.assign = np.zeros(n, dtype=np.int64)
        self.released = 0

    def release_rows(self, upto: int) -> None:
        """Give the pages of rows [.., upto) back to the system (their contents become zeros)."""
        end = (upto * self.d * 4) // PAGE * PAGE
        if end > self.released:
            self._buf.madvise(mmap.MADV_DONTNEED, self.released, end - self.released)
            self.released = end

    def close(self) -> None:
        self.x = np.zeros((0, self.d), np.float32)
        self._buf.close()


def fill_sides(syn: Synth, f: float, spaces: dict[str, Space]) -> dict[str, Side]:
    """Generate every chunk again; v2 vectors of the moved items to NEW, v1 of the rest to OLD. Each side's
    rows are stored in coarse-list order (by list, then id), so every IVF list is one contiguous run of rows."""
    mv_all = moved(np.arange(syn.n, dtype=np.int64), f)
    sides, dest = {}, {}
    for s, sel in (("new", mv_all), ("old", ~mv_all)):
        ids = np.flatnonzero(sel).astype(np.int64)
        assign = spaces[s].assign[ids].astype(np.int64)
        order = np.argsort(assign, kind="stable")
        side = sides[s] = Side(len(ids), syn.d)
        side.ids[:], side.assign[:] = ids[order], assign[order]
        dest[s] = np.empty(len(ids), dtype=np.int64)
        dest[s][order] = np.arange(len(ids))  # row (in id order) -> its place in list order
    del mv_all
    at = {"new": 0, "old": 0}
    for c in range(syn.chunks):
        ids, x1 = syn.v1(c)
        mv = moved(ids, f)
        for s, sel, x in (("new", mv, syn.v2(x1[mv]) if mv.any() else None), ("old", ~mv, x1[~mv])):
            m, a = int(sel.sum()), at[s]
            if m:
                sides[s].x[dest[s][a : a + m]] = x
            at[s] += m
    return sides


# ------------------------------------------------------------------------------------- the indices


def ivf_bytes(ix: Any) -> int:
    """What `faiss.serialize_index` writes for an IVF-Flat / IVF-PQ: the codes and ids of every list, the
    coarse centroids and the PQ codebooks (headers of a few hundred bytes left out)."""
    import faiss

    inv = ix.invlists
    entries = sum(inv.list_size(lst) for lst in range(ix.nlist))
    size = entries * (ix.code_size + 8) + ix.nlist * ix.d * 4
    if isinstance(ix, faiss.IndexIVFPQ):
        size += ix.pq.M * ix.pq.ksub * ix.pq.dsub * 4
    return int(size)


def flat_bytes(n: int, d: int) -> int:
    """What `faiss.serialize_index` writes for `IndexIDMap(IndexFlatL2)`: the vectors and the id map."""
    return n * (d * 4 + 8)


def refine_store_bytes(n: int, d: int) -> int:
    """The exact vectors of ",RFlat" as `service.rescore.ItemVectors` keeps them: vectors, row->id, id->row."""
    return n * (d * 4 + 16)


def build_pq(side: Side, sp: Space) -> Any:
    import faiss

    ix: Any = faiss.clone_index(sp.pq)
    step = 65_536
    for a in range(0, side.n, step):
        x = np.ascontiguousarray(side.x[a : a + step])
        pos = np.arange(a, a + len(x), dtype=np.int64)
        asg = np.ascontiguousarray(side.assign[a : a + step])
        ix.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(pos), faiss.swig_ptr(asg))
    return ix


def build_ivf_flat(side: Side, sp: Space) -> Any:
    """IVF-Flat over the side's rows (stored in list order): each list filled by one `add_entries` from its run
    of rows, so it is allocated once at its final size, and the copied rows are released as it goes."""
    import faiss

    d, nlist = side.d, len(sp.centroids)
    q: Any = faiss.IndexFlatL2(d)
    q.add(sp.centroids)
    ix: Any = faiss.IndexIVFFlat(q, d, nlist)
    ix.own_fields = True
    q.this.disown()
    inv = faiss.downcast_InvertedLists(ix.invlists)
    starts = np.concatenate([[0], np.cumsum(np.bincount(side.assign, minlength=nlist))]).tolist()
    for lst in range(nlist):
        a, b = starts[lst], starts[lst + 1]
        if b > a:
            pos = np.arange(a, b, dtype=np.int64)
            codes = side.x[a:b].view(np.uint8)
            inv.add_entries(lst, b - a, faiss.swig_ptr(pos), faiss.swig_ptr(codes))
            side.release_rows(b)
    ix.ntotal = side.n
    return ix


SearchFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def flat_search(side: Side, k: int) -> SearchFn:
    import faiss

    def run(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, p = faiss.knn(q, side.x, k)
        return d, np.where(p >= 0, side.ids[np.clip(p, 0, None)], -1)

    return run


def ivf_search(side: Side, ix: Any, nprobe: int, k: int, k_factor: int = 0) -> SearchFn:
    """The IVF's k nearest (rows -> item ids); with `k_factor`, its top k_factor * k re-ranked exactly
    against the side's float32 vectors (what the service's ",RFlat" does)."""
    ix.nprobe = nprobe

    def run(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not k_factor:
            d, p = ix.search(q, k)
            return np.where(p >= 0, d, np.inf), np.where(p >= 0, side.ids[np.clip(p, 0, None)], -1)
        _, cand = ix.search(q, k * k_factor)
        cand = cand[0][cand[0] >= 0]
        dist = ((side.x[cand] - q[0]) ** 2).sum(axis=1)
        o = np.argsort(dist, kind="stable")[:k]
        return dist[o][None, :].astype(np.float32), side.ids[cand[o]][None, :]

    return run


def measure(fns: dict[str, SearchFn], qs: dict[str, np.ndarray], truth: np.ndarray, k: int) -> dict[str, Any]:
    """Each query alone: both sides searched and merged, timed; recall@k of the merged ids against `truth`."""
    m = len(truth)
    got = np.full((m, k), -1, dtype=np.int64)
    ts = []
    for j in [0, 1, 2, *range(m)]:  # three untimed warm-up queries
        t0 = time.perf_counter()
        res = {s: fn(qs[s][j : j + 1]) for s, fn in fns.items()}
        got[j] = merged_ids(res.get("new"), res.get("old"), k)[0]
        ts.append(time.perf_counter() - t0)
    ts = ts[3:]
    return {
        "recall": recall_at(got, truth, k),
        "p50_ms": float(np.quantile(ts, 0.5) * 1000),
        "p99_ms": float(np.quantile(ts, 0.99) * 1000),
        "ids": got,
    }


# ------------------------------------------------------------------------------------- one fraction


def row(index: str, setting: str, f: float, r: dict[str, Any], bpi: float, build_s: float | None) -> dict[str, Any]:
    return {
        "index": index,
        "setting": setting,
        "fraction": f,
        "bytes_per_item": bpi,
        "recall": r["recall"],
        "p50_ms": r["p50_ms"],
        "p99_ms": r["p99_ms"],
        "build_s": build_s,
    }


def log(msg: str) -> None:
    """Progress on stderr (a 10M run takes tens of minutes): the time and the process's RSS now and at peak."""
    import sys

    rss, peak = rss_bytes() / 2**30, rss_bytes("VmHWM") / 2**30
    print(
        f"[scale {time.strftime('%H:%M:%S')}] {msg} (rss {rss:.2f} GiB, peak {peak:.2f} GiB)",
        file=sys.stderr,
        flush=True,
    )


def threads_to(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(n)


def _built(
    label: str,
    key: str,
    build: Callable[[Side, Space], Any],
    f: float,
    live: dict[str, Side],
    spaces: dict[str, Space],
    info: dict[str, float],
    threads: int,
) -> tuple[dict[str, Any], float]:
    """One index type built over every non-empty side on all cores (its seconds in `info[key]`), then the
    search threads restored; returns the indices and their serialized bytes."""
    threads_to(os.cpu_count() or 1)
    t0 = time.perf_counter()
    built = {s: build(sd, spaces[s]) for s, sd in live.items()}
    info[key] = time.perf_counter() - t0
    log(f"fraction {f}: {label} added in {info[key]:.0f} s")
    threads_to(threads)
    return built, float(sum(ivf_bytes(ix) for ix in built.values()))


def fraction_rows(
    syn: Synth, f: float, spaces: dict[str, Space], qs: dict[str, np.ndarray], truth: np.ndarray, k: int, threads: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every index type at one fraction, one at a time: Flat, IVF-PQ (plain and re-ranked), IVF-Flat."""
    n, d = syn.n, syn.d
    t0 = time.perf_counter()
    sides = fill_sides(syn, f, spaces)
    live = {s: sd for s, sd in sides.items() if sd.n}
    info = {"fill_s": time.perf_counter() - t0}
    log(f"fraction {f}: sides filled in {info['fill_s']:.0f} s; Flat")
    threads_to(threads)
    rows = [row("Flat", "exact", f, measure({s: flat_search(sd, k) for s, sd in live.items()}, qs, truth, k),
                 flat_bytes(n, d) / n, None)]  # fmt: skip
    pq, pq_b = _built("IVF-PQ", "ivf_pq_add_s", build_pq, f, live, spaces, info, threads)
    pq_b /= n
    for p in NPROBES:
        r = measure({s: ivf_search(live[s], ix, p, k) for s, ix in pq.items()}, qs, truth, k)
        rows.append(row(f"IVF{len(spaces['old'].centroids)},PQ{PQ_M}", f"nprobe={p}", f, r, pq_b, info["ivf_pq_add_s"]))
    for p, kf in REFINE:
        r = measure({s: ivf_search(live[s], ix, p, k, kf) for s, ix in pq.items()}, qs, truth, k)
        rows.append(
            row(
                f"IVF{len(spaces['old'].centroids)},PQ{PQ_M},RFlat",
                f"nprobe={p}, k_factor={kf}",
                f,
                r,
                pq_b + refine_store_bytes(n, d) / n,
                info["ivf_pq_add_s"],
            )
        )
    del pq
    gc.collect()
    ivf, flat_b = _built("IVF-Flat", "ivf_flat_add_s", build_ivf_flat, f, live, spaces, info, threads)
    flat_b /= n
    for p in NPROBES:
        r = measure({s: ivf_search(live[s], ix, p, k) for s, ix in ivf.items()}, qs, truth, k)
        rows.append(row(f"IVF{len(spaces['old'].centroids)},Flat", f"nprobe={p}", f, r, flat_b, info["ivf_flat_add_s"]))
    del ivf
    for sd in sides.values():
        sd.close()
    gc.collect()
    info["rss_peak_gib"] = rss_bytes("VmHWM") / 2**30
    return rows, info


# ------------------------------------------------------------------------------------- the section


def faiss_study(n: int, k: int, n_queries: int, threads: int) -> dict[str, Any]:
    """Train, the exact pass (with the coarse assignments), then each fraction's indices."""
    threads_to(os.cpu_count() or 1)
    t_all = time.perf_counter()
    syn = Synth(n)
    log(f"{n:,} items: training")
    spaces = train_spaces(syn)
    qn, qo = syn.queries(n_queries)
    log("exact pass")
    truth = exact_pass(syn, qn, qo, k, spaces)
    log(f"exact pass done in {truth.seconds:.0f} s")
    rows: list[dict[str, Any]] = []
    per_fraction = []
    for f in FRACTIONS:
        r, info = fraction_rows(syn, f, spaces, {"new": qn, "old": qo}, truth.merged[f], k, threads)
        rows += r
        per_fraction.append({"fraction": f, **info})
        threads_to(os.cpu_count() or 1)
    return {
        "items": n,
        "dim": syn.d,
        "queries": len(qn),
        "k": k,
        "clusters": len(syn.centers),
        "nlist": n_lists(n),
        "pq_m": PQ_M,
        "train_s": {s: sp.train_s for s, sp in spaces.items()},
        "assign_s": {s: sp.assign_s for s, sp in spaces.items()},
        "exact_pass_s": truth.seconds,
        "per_fraction": per_fraction,
        "rows": rows,
        "seconds": time.perf_counter() - t_all,
        "rss_peak_gib": rss_bytes("VmHWM") / 2**30,
    }


def section_scale(cfg: BenchConfig) -> dict[str, Any]:
    n_q = cfg.q(100, 20)
    out: dict[str, Any] = {"faiss": faiss_study(cfg.size("scale_n"), cfg.k, n_q, cfg.threads)}
    try:
        from devtools.bench.scale_milvus import milvus_rows

        out["milvus"] = milvus_rows(cfg.size("milvus_n"), cfg.k, n_q, cfg.threads)
    except Exception as e:  # the FAISS rows stand on their own
        out["milvus"] = {"error": f"{type(e).__name__}: {e}"}
    out["rss_peak_gib"] = rss_bytes("VmHWM") / 2**30
    return out
