"""Section 8: 1M items: start-up rebuild from Postgres (rows loaded with binary COPY), IVF / HNSW
recall@10 vs Flat with their speed-up, and memory per item of compressed indices (IVF-PQ, and IVF-PQ with
exact re-ranking) beside Flat."""

from __future__ import annotations

import datetime as dt
import gc
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from devtools.bench.common import clustered, recall_at, rss_bytes, scratch_database, unit_centers
from devtools.bench.config import BenchConfig
from devtools.bench.memory import in_child

# ------------------------------------------------------------------------------------ the rebuild


def child_rebuild(db_url: str, batch_size: int, q: Any) -> None:
    """Fresh process: the runtime's start-up rebuild (Follower.sync_once) from Postgres; time and RSS."""
    from service.config import Settings
    from service.db import make_engine, make_sessionmaker
    from service.index import IndexManager
    from service.ingest import Follower

    settings = Settings(database_url=db_url, log_level="WARNING")
    engine = make_engine(settings)
    with engine.connect():
        pass
    gc.collect()
    rss0 = rss_bytes()
    manager = IndexManager()

    def no_forward(a: str, b: str, v: np.ndarray) -> np.ndarray:
        raise AssertionError("no forward mode here")

    f = Follower(
        make_sessionmaker(engine),
        manager,
        factory="Flat",
        use_gpu=False,
        batch_size=batch_size,
        poll_seconds=0.5,
        forward=no_forward,
        r=None,
    )
    t0 = time.perf_counter()
    f.sync_once()
    secs = time.perf_counter() - t0
    gc.collect()
    ix = manager.current
    q.put(
        {
            "seconds": secs,
            "vectors": len(ix.new) if ix is not None and ix.new is not None else 0,
            "rss_before": rss0,
            "rss_after": rss_bytes(),
            "rss_peak": rss_bytes("VmHWM"),
        }
    )
    engine.dispose()


# ------------------------------------------------------------------------------------ binary COPY

COPY_HEAD, COPY_TAIL = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8, b"\xff\xff"
ITEM_ROW = np.dtype(
    [
        ("nf", ">i2"),
        ("l1", ">i4"),
        ("id", ">i8"),
        ("l2", ">i4"),
        ("ext", "S11"),
        ("l3", ">i4"),
        ("payload", "S1"),
        ("l4", ">i4"),
        ("label", ">i4"),
        ("l5", ">i4"),
        ("cat", ">i8"),
        ("l6", ">i4"),
        ("uat", ">i8"),
    ]
)


def _embedding_row(d: int) -> np.dtype:
    return np.dtype(
        [
            ("nf", ">i2"),
            ("l1", ">i4"),
            ("item", ">i8"),
            ("l2", ">i4"),
            ("mv", "S2"),
            ("l3", ">i4"),
            ("vec", "u1", (d * 4,)),
            ("l4", ">i4"),
            ("cat", ">i8"),
        ]
    )


def _register_v1(db_url: str, d: int) -> None:
    from service.config import Settings
    from service.db import make_engine, make_sessionmaker
    from service.db.models import ModelVersion

    engine = make_engine(Settings(database_url=db_url, log_level="WARNING"))
    with make_sessionmaker(engine)() as s:
        s.add(
            ModelVersion(
                name="v1", dim=d, artifact_path="/nonexistent/synthetic", checksum="synthetic", status="serving"
            )
        )
        s.commit()
    engine.dispose()


def _conninfo(db_url: str) -> str:
    import sqlalchemy as sa

    url = sa.engine.make_url(db_url)
    conninfo = f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"
    if url.password:
        conninfo += f" password={url.password}"
    return conninfo


def _item_rows(ids: np.ndarray, now_us: int) -> bytes:
    rec = np.zeros(len(ids), ITEM_ROW)
    rec["nf"], rec["l1"], rec["id"], rec["l2"] = 6, 8, ids, 11
    rec["ext"] = np.array([f"syn-{i:07d}".encode() for i in ids.tolist()], dtype="S11")
    rec["l3"], rec["payload"], rec["l4"], rec["label"] = 1, b"\x00", 4, ids % 10
    rec["l5"], rec["cat"], rec["l6"], rec["uat"] = 8, now_us, 8, now_us
    return rec.tobytes()


def _embedding_rows(ids: np.ndarray, vecs: np.ndarray, now_us: int) -> bytes:
    d = vecs.shape[1]
    rec = np.zeros(len(ids), _embedding_row(d))
    rec["nf"], rec["l1"], rec["item"], rec["l2"], rec["mv"] = 4, 8, ids, 2, b"v1"
    rec["l3"] = d * 4
    rec["vec"] = vecs.astype("<f4").view(np.uint8).reshape(-1, d * 4)
    rec["l4"], rec["cat"] = 8, now_us
    return rec.tobytes()


def copy_embeddings(db_url: str, n: int, d: int, seed: int = 5, chunk: int = 100_000) -> dict[str, Any]:
    """Insert `n` items and their d-dim v1 embeddings (clustered synthetic) with binary COPY."""
    import psycopg

    _register_v1(db_url, d)
    epoch = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    now_us = int((dt.datetime.now(dt.UTC) - epoch).total_seconds() * 1e6)
    rng = np.random.default_rng(seed)
    centers = unit_centers(d)
    chunks = [np.arange(a + 1, min(a + chunk, n) + 1, dtype=np.int64) for a in range(0, n, chunk)]
    t0 = time.perf_counter()
    with psycopg.connect(_conninfo(db_url)) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY items (id, external_id, payload, label, created_at, updated_at) FROM STDIN WITH (FORMAT BINARY)"
        ) as cp:
            cp.write(COPY_HEAD)
            for ids in chunks:
                cp.write(_item_rows(ids, now_us))
            cp.write(COPY_TAIL)
        with cur.copy(
            "COPY embeddings (item_id, model_version, vector, created_at) FROM STDIN WITH (FORMAT BINARY)"
        ) as cp:
            cp.write(COPY_HEAD)
            for ids in chunks:
                cp.write(_embedding_rows(ids, clustered(rng, len(ids), d, centers), now_us))
            cp.write(COPY_TAIL)
        cur.execute("SELECT setval(pg_get_serial_sequence('items', 'id'), %s)", (n,))
        conn.commit()
        cur.execute("ANALYZE items")
        cur.execute("ANALYZE embeddings")
        conn.commit()
    return {"rows": n, "copy_seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------- ANN recall


COMPRESSED = ("IVF1024,PQ16", "IVF1024,PQ16,RFlat")  # 16 bytes of code per d=64 vector (256 raw)


def _build(n: int, d: int, threads: int) -> dict[str, tuple[Any, float]]:
    """Flat, IVF1024,Flat, HNSW32 and the compressed indices over `n` clustered vectors (builds use every
    core): (index, seconds)."""
    import faiss

    from service.index import VectorIndex

    rng = np.random.default_rng(21)
    centers = unit_centers(d)
    vecs = np.concatenate([clustered(rng, min(100_000, n - a), d, centers) for a in range(0, n, 100_000)])
    ids = np.arange(1, n + 1, dtype=np.int64)
    out: dict[str, tuple[Any, float]] = {}
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # builds use every core, as a start-up would
    for factory in ("Flat", "IVF1024,Flat", "HNSW32", *COMPRESSED):
        t0 = time.perf_counter()
        vi = VectorIndex(d, factory, space="v1")
        vi.add(ids, vecs)
        out[factory] = (vi, time.perf_counter() - t0)
    faiss.omp_set_num_threads(threads)
    return out


def _timed(vi: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Each query alone: the ids found, and the median seconds per query."""
    n_q = len(queries)
    out = np.empty((n_q, k), np.int64)
    ts = []
    for j in range(n_q):
        t0 = time.perf_counter()
        _, i = vi.search(queries[j : j + 1], k)
        ts.append(time.perf_counter() - t0)
        out[j] = i[0]
    return out, float(np.median(ts))


KNOBS: list[tuple[str, str, Callable[[Any, int], None], tuple[int, ...]]] = [
    ("IVF1024,Flat", "nprobe", lambda ix, v: setattr(ix, "nprobe", v), (1, 8, 32)),
    ("HNSW32", "efSearch", lambda ix, v: setattr(ix.hnsw, "efSearch", v), (16, 64, 128)),
]


# (factory, nprobe or efSearch, k_factor): the memory table's settings, beside Flat
MEMORY_ROWS: list[tuple[str, int, int]] = [
    ("IVF1024,Flat", 8, 0),
    ("IVF1024,Flat", 32, 0),
    ("HNSW32", 64, 0),
    ("IVF1024,PQ16", 8, 0),
    ("IVF1024,PQ16", 32, 0),
    ("IVF1024,PQ16,RFlat", 8, 4),
    ("IVF1024,PQ16,RFlat", 32, 4),
    ("IVF1024,PQ16,RFlat", 32, 16),
]


def memory_rows(
    built: dict[str, tuple[Any, float]], queries: np.ndarray, truth: np.ndarray, flat_t: float, k: int
) -> list[dict[str, Any]]:
    """Memory per item (`VectorIndex.memory_bytes`: the FAISS index as `faiss.serialize_index` writes it,
    plus a re-ranking index's exact vectors and a tombstone index's host copy; not the 1 B/item id bitmap),
    recall@k against exact search and single-query p50 for each of MEMORY_ROWS, Flat first."""
    flat = built["Flat"][0]
    rows = [
        {
            "index": "Flat",
            "setting": "exact",
            "build_s": built["Flat"][1],
            "bytes_per_item": flat.memory_bytes() / len(flat),
            "recall": 1.0,
            "p50_ms": flat_t * 1000,
            "speedup": 1.0,
        }
    ]
    for factory, probe, k_factor in MEMORY_ROWS:
        vi = built[factory][0]
        if vi.staged:
            setting = "exact staging (too few vectors to train)"
        elif factory.startswith("HNSW"):
            vi._index.hnsw.efSearch = probe
            setting = f"efSearch={probe}"
        else:
            vi._index.nprobe = probe
            setting = f"nprobe={probe}"
        if k_factor:
            vi.k_factor = k_factor
            setting += f", k_factor={k_factor}"
        got, t = _timed(vi, queries, k)
        rows.append(
            {
                "index": factory,
                "setting": setting,
                "build_s": built[factory][1],
                "bytes_per_item": vi.memory_bytes() / len(vi),
                "recall": recall_at(got, truth, k),
                "p50_ms": t * 1000,
                "speedup": flat_t / t,
            }
        )
    return rows


def recall_study(cfg: BenchConfig, n: int, d: int = 64) -> dict[str, Any]:
    """Flat vs IVF1024,Flat vs HNSW32 (the service's VectorIndex) on `n` clustered vectors: build time,
    recall@k against Flat, single-query latency and speed-up, at the FAISS defaults and a few settings."""
    n_q = cfg.q(200, 20)
    k = cfg.k
    built = _build(n, d, cfg.threads)
    queries = clustered(np.random.default_rng(99), n_q, d, unit_centers(d))
    truth, flat_t = _timed(built["Flat"][0], queries, k)
    flat = {"index": "Flat", "setting": "exact", "build_s": built["Flat"][1], "p50_ms": flat_t * 1000}
    rows = [{**flat, "recall": 1.0, "speedup": 1.0}]
    for factory, knob, setter, values in KNOBS:
        vi, build_s = built[factory]
        inner = vi._index
        nlist = getattr(inner, "nlist", None)
        # Too few vectors to train the IVF (--quick): it is still the exact staging index, with no knob.
        for v in (None,) if vi.staged else values:
            if v is not None:
                setter(inner, v)
            got, t = _timed(vi, queries, k)
            rec = float(
                np.mean([len(set(g) & set(tr)) / k for g, tr in zip(got.tolist(), truth.tolist(), strict=True)])
            )
            rows.append(
                {
                    "index": factory if nlist is None else f"IVF{nlist},Flat",
                    "setting": "exact staging (too few vectors to train)"
                    if v is None
                    else f"{knob}={v}" + (" (default)" if v in (1, 16) else ""),
                    "build_s": build_s,
                    "p50_ms": t * 1000,
                    "recall": rec,
                    "speedup": flat_t / t,
                }
            )
    memory = memory_rows(built, queries, truth, flat_t, k)
    built.clear()
    gc.collect()
    return {
        "memory": memory,
        "items": n,
        "dim": d,
        "queries": n_q,
        "k": k,
        "data": "4,096 Gaussian clusters on the unit sphere",
        "rows": rows,
    }


def section_large(cfg: BenchConfig) -> dict[str, Any]:
    n, d = cfg.size("large_n"), 64
    out: dict[str, Any] = {"items": n, "dim": d}
    with scratch_database(cfg, "bench_1m") as db_url:
        out["copy"] = copy_embeddings(db_url, n, d)
        from service.config import Settings

        bsz = Settings().rebuild_batch_size
        r = in_child(child_rebuild, db_url, bsz)
        raw = n * d * 4
        out["rebuild"] = {
            **r,
            "batch_size": bsz,
            "items_per_second": r["vectors"] / r["seconds"],
            "memory_ratio": (r["rss_after"] - r["rss_before"]) / raw,
            "peak_ratio": (r["rss_peak"] - r["rss_before"]) / raw,
        }
    out["recall"] = recall_study(cfg, n, d)
    return out
