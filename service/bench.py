"""`backfill bench`: every performance figure of issue 9 measured beside its baseline in one run.

Writes ``runs/bench/results.json`` and ``runs/bench/results.md`` (a markdown table plus detail tables) with
the machine (CPU model, cores, torch / faiss versions, device). Sections (``--only 1,3`` picks some):

1. merged OLD+NEW search vs one index over all items: real gallery (Fashion-MNIST test embedded with the
   shipped v1/v2, OLD queried with psi(v2(q)) and calibrated) and synthetic d=64 vectors, Flat and IVF;
2. query encoding single pass (v2 + psi) vs two passes (v2 + v1) (`scripts/bench_search.py`);
3. end-to-end ``POST /search`` (the real app in-process under uvicorn on a loopback port, scratch Postgres
   + Redis, during a rollout) vs the bare FAISS searches for the same queries, by stage;
4. backfill items/s per worker vs the raw batched encoder; two workers vs one (`scripts/bench_backfill.py`);
5. ingestion lag, commit -> searchable in the API's index (Redis event, and polling alone);
6. offline harness curve time (FAISS top-k) vs the dense-matrix approach (`models/evaluate.py`);
7. API process memory per item for 1M d=64 vectors vs the raw vector bytes (in a fresh process);
8. 1M items: start-up rebuild from Postgres (rows loaded with binary COPY), and IVF / HNSW recall@10 vs
   Flat with their speed-up.

``--quick`` shrinks every size so the whole run takes well under a minute.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import gc
import importlib
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer

REPO = Path(__file__).resolve().parent.parent
SECTIONS = (1, 2, 3, 4, 5, 6, 7, 8)
MERGE_TARGET, ENCODE_TARGET, WORKER_TARGET, LAG_P99_TARGET, MEMORY_TARGET = 1.15, 0.6, 0.8, 1.0, 1.3


# ------------------------------------------------------------------------------------------------ config


@dataclass
class BenchConfig:
    quick: bool = False
    only: tuple[int, ...] = SECTIONS
    artifacts: Path = REPO / "artifacts"
    out_dir: Path = REPO / "runs" / "bench"
    pg: str = os.environ.get("BACKFILL_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    redis: str = "redis://127.0.0.1:6379/13"
    threads: int = 1
    wait_artifacts: float = 0.0
    update: bool = False  # keep the other sections of an existing results.json
    k: int = 10
    # sizes (None = the full / quick default)
    real_n: int | None = None
    synth_n: int | None = None
    large_n: int | None = None
    e2e_n: int | None = None
    backfill_items: int | None = None

    def size(self, name: str) -> int:
        full = {"real_n": 10_000, "synth_n": 1_000_000, "large_n": 1_000_000, "e2e_n": 10_000, "backfill_items": 5_000}
        quick = {"real_n": 2_000, "synth_n": 20_000, "large_n": 20_000, "e2e_n": 1_000, "backfill_items": 300}
        v = getattr(self, name)
        return int(v) if v is not None else (quick if self.quick else full)[name]

    def q(self, full: int, quick: int) -> int:
        return quick if self.quick else full


# ---------------------------------------------------------------------------------------------- helpers


def _scripts(name: str) -> Any:
    """Import scripts/<name>.py by module name (spawned worker processes import it the same way)."""
    for p in (str(REPO), str(REPO / "scripts")):
        if p not in sys.path:
            sys.path.insert(0, p)
    return importlib.import_module(name)


def machine() -> dict[str, Any]:
    import faiss
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no GPU)",
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _set_threads(n: int) -> None:
    import faiss
    import torch

    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)


def _rss_bytes(key: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def clustered(rng: np.random.Generator, n: int, d: int, centers: np.ndarray) -> np.ndarray:
    """`n` L2-normalised vectors around random unit centres (noise norm ~0.6): embedding-like clusters."""
    c = rng.integers(0, len(centers), n)
    v = centers[c] + rng.normal(scale=0.6 / np.sqrt(d), size=(n, d)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def unit_centers(d: int, n_centers: int = 4096, seed: int = 123) -> np.ndarray:
    c = np.random.default_rng(seed).normal(size=(n_centers, d)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


@dataclass
class Artifacts:
    """The shipped pair when present, else stand-ins (shipped CNN architectures, random weights)."""

    dirs: dict[str, Path]
    root: Path
    shipped: bool

    @property
    def label(self) -> str:
        if self.shipped:
            return f"artifacts from {self.root}"
        return "stand-in artifacts (shipped architectures, random weights)"


def find_artifacts(cfg: BenchConfig, scratch: Path) -> Artifacts:
    from models.artifacts import discover

    deadline = time.monotonic() + cfg.wait_artifacts
    while True:
        encoders, packs = discover(cfg.artifacts)
        if {"v1", "v2"} <= set(encoders) and ("v1", "v2") in packs:
            return Artifacts(
                {"v1": encoders["v1"], "v2": encoders["v2"], "compat": packs[("v1", "v2")]}, cfg.artifacts, True
            )
        if time.monotonic() >= deadline:
            break
        typer.echo(f"waiting for artifacts under {cfg.artifacts} ...", err=True)
        time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))
    bb = _scripts("bench_backfill")
    root = scratch / "standin-artifacts"
    return Artifacts(bb._standin_artifacts(root), root, False)


def fashion_test(cfg: BenchConfig, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The first `n` Fashion-MNIST test images (labels), or upscaled digits when the dataset is absent."""
    from service.config import Settings

    try:
        from models.data import load_fashion_mnist

        x, y = load_fashion_mnist(Settings().fashion_mnist_dir, "test")
        return x[:n], y[:n], "Fashion-MNIST test"
    except FileNotFoundError:
        from worker.testing import gallery_images

        return gallery_images(n), np.arange(n) % 10, "sklearn digits (upscaled)"


def _ok(value: float | None, target: float, higher_is_better: bool = False) -> str:
    if value is None:
        return "n/a"
    return "yes" if (value >= target if higher_is_better else value <= target) else "NO"


@contextlib.contextmanager
def scratch_database(cfg: BenchConfig, prefix: str) -> Iterator[str]:
    """A fresh, migrated Postgres database on the configured server, dropped afterwards."""
    import sqlalchemy as sa

    from service.config import Settings
    from service.db.migrate import upgrade_head

    _scripts("bench_backfill")  # puts the repo root on sys.path for tests.conftest
    from tests.conftest import create_database, drop_database

    server = sa.engine.make_url(cfg.pg)
    if server.drivername == "postgresql":
        server = server.set(drivername="postgresql+psycopg")
    url = create_database(server, prefix)
    try:
        rendered = url.render_as_string(hide_password=False)
        upgrade_head(Settings(database_url=rendered, log_level="WARNING"))
        yield rendered
    finally:
        drop_database(server, url)


# ------------------------------------------------------------------------------- 1 and 2: search, encode


def section_merge(cfg: BenchConfig, art: Artifacts) -> dict[str, Any]:
    bs = _scripts("bench_search")
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    k = cfg.k
    # real gallery: NEW = v2 vectors, OLD = v1 vectors searched with psi(v2(q)), calibrated OLD distances
    if art.shipped:
        from models.artifacts import load_compat, load_encoder

        n = cfg.size("real_n")
        images, _, data = fashion_test(cfg, n)
        v1, v2 = load_encoder(art.dirs["v1"]), load_encoder(art.dirs["v2"])
        pack = load_compat(art.dirs["compat"])
        g_new, g_old = v2.embed(images), v1.embed(images)
        q_old = pack.reverse(g_new)
        for factory in ("Flat", "IVF1024,Flat"):
            for batch in (1, 32):
                r = bs.bench_merge(
                    len(images),
                    cfg.q(300, 20) if batch == 1 else cfg.q(60, 5),
                    k,
                    batch,
                    factory=factory,
                    vecs=g_new,
                    old_vecs=g_old,
                    queries=g_new,
                    old_queries=q_old,
                    calibrate=lambda d: pack.calibrate("reverse", d),
                )
                rows.append({"data": f"{data} ({len(images):,}) embedded v1/v2", **r})
    else:
        notes.append(f"real-gallery rows skipped: shipped artifacts not found under {cfg.artifacts}")
    n = cfg.size("synth_n")
    big = n >= 500_000
    for factory in ("Flat", "IVF1024,Flat"):
        for batch in (1, 32):
            nq = (cfg.q(60, 10) if big else cfg.q(300, 20)) if batch == 1 else (cfg.q(12, 3) if big else cfg.q(60, 5))
            r = bs.bench_merge(n, nq, k, batch, 64, factory=factory)
            rows.append({"data": f"synthetic random unit d=64 ({n:,})", **r})
    notes.append(
        "IVF: the service's VectorIndex (exact until 39 x nlist vectors, then trained on all; nprobe = FAISS default 1)"
    )
    return {"rows": rows, "notes": notes}


def section_encode(cfg: BenchConfig, art: Artifacts) -> dict[str, Any]:
    bs = _scripts("bench_search")
    rows = []
    for batch in (1, 32):
        r = bs.bench_encode(art.root, cfg.q(200, 20) if batch == 1 else cfg.q(50, 5), batch)
        if r is not None:
            rows.append(r)
    return {"rows": rows, "artifacts": art.label}


# --------------------------------------------------------------------------- 3 and 5: the live service


@dataclass
class LiveService:
    base_url: str
    runtime: Any
    item_ids: list[int]
    old_ids: list[int]
    v2: np.ndarray
    images: np.ndarray
    db_url: str
    data: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def live_service(cfg: BenchConfig, art: Artifacts, n: int) -> Iterator[LiveService]:
    """The real app under uvicorn in this process on a scratch Postgres + Redis, mid-rollout (reverse):
    half the gallery backfilled (NEW, v2), half not (OLD, v1)."""
    import httpx
    import redis as redis_lib
    import sqlalchemy as sa
    import uvicorn

    from models.artifacts import load_encoder
    from service.api.app import create_app
    from service.config import Settings
    from service.db import make_engine, make_sessionmaker
    from service.db.models import Embedding, Rollout
    from worker.testing import seed_gallery

    images, _, data = fashion_test(cfg, n)
    with scratch_database(cfg, "bench_api") as db_url:
        redis_lib.Redis.from_url(cfg.redis).flushdb()
        settings = Settings(
            database_url=db_url,
            redis_url=cfg.redis,
            artifacts_dir=art.root,
            log_level="WARNING",
            data_dir=Path(tempfile.gettempdir()) / f"bench-api-{os.getpid()}",
            use_gpu=False,
        )
        engine = make_engine(settings)
        maker = make_sessionmaker(engine)
        with maker() as s:
            ids = seed_gallery(s, art.dirs, n, images=images)
        v2 = load_encoder(art.dirs["v2"]).embed(images)
        half = n // 2
        with maker() as s:
            s.execute(
                sa.insert(Embedding),
                [
                    {"item_id": i, "model_version": "v2", "vector": v.astype("<f4").tobytes()}
                    for i, v in zip(ids[:half], v2[:half], strict=True)
                ],
            )
            s.add(
                Rollout(
                    from_version="v1",
                    to_version="v2",
                    mode="reverse",
                    policy="uncertainty",
                    status="running",
                    batch_size=256,
                    active_lock=1,
                )
            )
            s.commit()
        app = create_app(settings)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
        th = threading.Thread(target=server.run, name="bench-uvicorn", daemon=True)
        th.start()
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline or not th.is_alive():
                    raise RuntimeError("the API did not become ready")
                time.sleep(0.2)
            yield LiveService(base, app.state.runtime, ids, ids[half:], v2, images, db_url, data)
        finally:
            server.should_exit = True
            th.join(30)
            engine.dispose()


def _stage_totals() -> dict[str, tuple[float, float]]:
    from prometheus_client import REGISTRY

    out = {}
    for st in ("decode", "encode", "search", "merge", "total"):
        s = REGISTRY.get_sample_value("backfill_search_stage_seconds_sum", {"stage": st}) or 0.0
        c = REGISTRY.get_sample_value("backfill_search_stage_seconds_count", {"stage": st}) or 0.0
        out[st] = (s, c)
    s = REGISTRY.get_sample_value("backfill_http_request_seconds_sum", {"route": "/search"}) or 0.0
    c = REGISTRY.get_sample_value("backfill_http_request_seconds_count", {"route": "/search"}) or 0.0
    out["http_middleware"] = (s, c)
    return out


def section_e2e(cfg: BenchConfig, live: LiveService) -> dict[str, Any]:
    import httpx

    from models.preprocess import encode_png

    bs = _scripts("bench_search")
    rt = live.runtime
    ix = rt.current()
    n_q = cfg.q(300, 20)
    rng = np.random.default_rng(7)
    pick = rng.choice(len(live.images), size=n_q, replace=n_q > len(live.images))
    bodies = [{"image_b64": base64.b64encode(encode_png(live.images[i])).decode(), "k": cfg.k} for i in pick]
    q_new, q_old = rt.encode_queries(ix.layout, live.images[pick])  # the same queries, encoded once
    client = httpx.Client(base_url=live.base_url, timeout=30)

    def e2e(i: int) -> object:
        r = client.post("/search", json=bodies[i])
        assert r.status_code == 200, r.text
        return r

    def bare(i: int) -> object:
        return ix.search(q_new[i : i + 1], q_old[i : i + 1], cfg.k)

    for i in range(min(10, n_q)):  # warm-up outside the histograms' window
        e2e(i)
    before = _stage_totals()
    t_e2e, t_bare = bs.time_pair(e2e, bare, n_q, warmup=0)
    after = _stage_totals()
    client.close()
    stages = {}
    for st, (s1, c1) in after.items():
        s0, c0 = before[st]
        stages[st] = (s1 - s0) / (c1 - c0) * 1000 if c1 > c0 else None
    e2e_mean = statistics.fmean(t_e2e) * 1000
    total = stages.get("total") or 0.0
    stages["client_wall"] = e2e_mean
    stages["http_and_framework"] = e2e_mean - total
    return {
        "gallery": len(live.item_ids),
        "data": live.data,
        "queries": n_q,
        "layout": "rollout v1 -> v2 (reverse), half backfilled",
        "e2e_p50_ms": bs.ms(t_e2e, 0.5),
        "e2e_p95_ms": bs.ms(t_e2e, 0.95),
        "e2e_mean_ms": e2e_mean,
        "bare_p50_ms": bs.ms(t_bare, 0.5),
        "bare_p95_ms": bs.ms(t_bare, 0.95),
        "bare_mean_ms": statistics.fmean(t_bare) * 1000,
        "overhead_p50_ms": bs.ms(t_e2e, 0.5) - bs.ms(t_bare, 0.5),
        "ratio_p50": statistics.median(t_e2e) / statistics.median(t_bare),
        "stage_mean_ms": stages,
    }


def section_lag(cfg: BenchConfig, live: LiveService) -> dict[str, Any]:
    """Backfill-style commits of v2 rows for OLD items; time from commit until the API's index serves
    them from NEW. With the Redis event (what the worker publishes) and by polling alone."""
    import sqlalchemy as sa

    from service import events
    from service.db import make_engine, make_sessionmaker
    from service.db.models import Embedding

    rt = live.runtime
    batch = cfg.q(16, 4)
    plan = {"event": cfg.q(100, 10), "poll": cfg.q(30, 4)}
    need = batch * sum(plan.values())
    pool = list(live.old_ids)
    if len(pool) < need:
        batch = max(1, len(pool) // sum(plan.values()))
    v2_of = dict(zip(live.item_ids, live.v2, strict=True))
    engine = make_engine(rt.settings)
    maker = make_sessionmaker(engine)
    rng = np.random.default_rng(3)
    out: dict[str, Any] = {"rows_per_commit": batch, "poll_seconds": rt.settings.ingest_poll_seconds}
    pos = 0
    for mode, samples in plan.items():
        lags = []
        for _ in range(samples):
            ids = pool[pos : pos + batch]
            pos += batch
            if not ids:
                break
            time.sleep(float(rng.uniform(0.0, 0.05)))  # decorrelate from the poll phase
            with maker() as s:
                s.execute(
                    sa.insert(Embedding),
                    [{"item_id": i, "model_version": "v2", "vector": v2_of[i].astype("<f4").tobytes()} for i in ids],
                )
                s.commit()
            t0 = time.perf_counter()
            if mode == "event":
                events.publish(rt.redis, events.EMBEDDINGS, count=len(ids))
            deadline = t0 + 30
            while True:
                ix = rt.manager.current
                if ix is not None and ix.side_of(ids[-1]) == "new" and all(i in ix.new for i in ids):
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError("ingestion did not catch up within 30 s")
                time.sleep(0.0005)
            lags.append(time.perf_counter() - t0)
        out[mode] = {
            "samples": len(lags),
            "p50_s": float(np.quantile(lags, 0.5)),
            "p99_s": float(np.quantile(lags, 0.99)),
            "max_s": float(max(lags)),
        }
    engine.dispose()
    return out


# ---------------------------------------------------------------------------------------- 4: backfill


def section_backfill(cfg: BenchConfig) -> dict[str, Any]:
    """scripts/bench_backfill.py as shipped, then once more with OMP_WAIT_POLICY=PASSIVE in the worker
    processes (a variant: torch's spinning OpenMP threads otherwise take the cores the worker's I/O thread
    and Postgres need on a small host)."""
    import sqlalchemy as sa

    bb = _scripts("bench_backfill")
    server = sa.engine.make_url(cfg.pg)
    if server.drivername == "postgresql":
        server = server.set(drivername="postgresql+psycopg")
    redis_url = cfg.redis.rsplit("/", 1)[0] + "/14"
    cores = os.cpu_count() or 1
    args = (cfg.size("backfill_items"), 256, cfg.artifacts, server.render_as_string(hide_password=False), redis_url)
    _set_threads(cores)  # raw gets the same torch threads the spawned workers get by default
    saved = os.environ.get("OMP_WAIT_POLICY")
    try:
        rep: dict[str, Any] = bb.run(*args, cfg.out_dir / "backfill.json")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read by the spawned workers' OpenMP runtime at start
        passive = bb.run(*args, cfg.out_dir / "backfill-omp-passive.json")
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = saved
        _set_threads(cfg.threads)
    rep["omp_passive"] = {
        "raw_encoder": passive["raw_encoder"],
        "one_worker": passive["one_worker"],
        "two_workers": passive["two_workers"],
        "one_worker_vs_raw": passive["one_worker_vs_raw"],
        "two_vs_one_worker": passive["two_vs_one_worker"],
    }
    return rep


# -------------------------------------------------------------------------------------- 6: the harness


def section_harness(cfg: BenchConfig, art: Artifacts) -> dict[str, Any]:
    from models.evaluate import N_POINTS, build_evaluator, dense_point, fractions, n_in_new, policy_order

    if not art.shipped:
        return {"skipped": f"shipped artifacts not found under {cfg.artifacts}"}
    n = cfg.size("real_n")
    images, labels, data = fashion_test(cfg, n)
    _set_threads(os.cpu_count() or 1)  # the harness's own setting (FAISS up to 2 threads)
    try:
        ev, sig = build_evaluator(images, labels, art.root)
        order = policy_order("uncertainty", n, sigma=sig["sigma"])
        t0 = time.perf_counter()
        curve = ev.curve(order, "reverse")
        faiss_curve = time.perf_counter() - t0
        picks = np.linspace(0, N_POINTS - 1, cfg.q(3, 1)).round().astype(int)
        fr = fractions()
        t_dense, diffs = 0.0, []
        for p in picks:
            mask = np.zeros(n, bool)
            mask[order[: n_in_new(fr[p], n)]] = True
            t0 = time.perf_counter()
            dm, _ = dense_point(ev, mask, "reverse")
            t_dense += time.perf_counter() - t0
            diffs.append(abs(dm - curve["map"][p]))
    finally:
        _set_threads(cfg.threads)
    dense_curve = t_dense / len(picks) * N_POINTS
    return {
        "n": n,
        "data": data,
        "configuration": "reverse / uncertainty, 22 points",
        "faiss_curve_s": faiss_curve,
        "dense_points_timed": len(picks),
        "dense_s_per_point": t_dense / len(picks),
        "dense_curve_s_extrapolated": dense_curve,
        "speedup": dense_curve / faiss_curve,
        "max_abs_map_difference": float(max(diffs)),
    }


# ------------------------------------------------------------------- 7 and 8: memory, rebuild, recall


def _child_index_memory(n: int, d: int, batch: int, q: Any) -> None:
    """Fresh process: RSS of an IndexManager holding `n` vectors the way the follower fills it."""
    from service.index import IndexManager, IndexSet, Layout, VectorIndex

    rng = np.random.default_rng(11)
    centers = unit_centers(d)
    gc.collect()
    rss0 = _rss_bytes()
    manager = IndexManager()
    ix = IndexSet(Layout(serving="v1"), new=VectorIndex(d, "Flat", space="v1"))
    manager.swap(ix)
    for a in range(0, n, batch):
        ids = np.arange(a + 1, min(a + batch, n) + 1, dtype=np.int64)
        ix.apply(to_new=(ids, clustered(rng, len(ids), d, centers)))
        for i in ids.tolist():
            manager.external_ids[i] = f"syn-{i:07d}"
    gc.collect()
    q.put(
        {"rss_before": rss0, "rss_after": _rss_bytes(), "rss_peak": _rss_bytes("VmHWM"), "vectors": len(ix.new or ())}
    )


def _child_rebuild(db_url: str, batch_size: int, q: Any) -> None:
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
    rss0 = _rss_bytes()
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
            "rss_after": _rss_bytes(),
            "rss_peak": _rss_bytes("VmHWM"),
        }
    )
    engine.dispose()


def _in_child(target: Callable[..., None], *args: Any, timeout: float = 1800) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    try:
        res: dict[str, Any] = q.get(timeout=timeout)
    finally:
        p.join(60)
    return res


def section_memory(cfg: BenchConfig) -> dict[str, Any]:
    n, d = cfg.size("large_n"), 64
    r = _in_child(_child_index_memory, n, d, 5000)
    raw = n * d * 4
    grown = r["rss_after"] - r["rss_before"]
    return {
        "items": n,
        "dim": d,
        "raw_bytes": raw,
        **r,
        "bytes_per_item": grown / n,
        "ratio": grown / raw,
        "peak_ratio": (r["rss_peak"] - r["rss_before"]) / raw,
    }


def copy_embeddings(db_url: str, n: int, d: int, seed: int = 5, chunk: int = 100_000) -> dict[str, Any]:
    """Insert `n` items and their d-dim v1 embeddings (clustered synthetic) with binary COPY."""
    import psycopg
    import sqlalchemy as sa

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
    url = sa.engine.make_url(db_url)
    conninfo = f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"
    if url.password:
        conninfo += f" password={url.password}"
    epoch = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    now_us = int((dt.datetime.now(dt.UTC) - epoch).total_seconds() * 1e6)
    head, tail = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8, b"\xff\xff"
    it_dt = np.dtype(
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
    em_dt = np.dtype(
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
    rng = np.random.default_rng(seed)
    centers = unit_centers(d)
    t0 = time.perf_counter()
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY items (id, external_id, payload, label, created_at, updated_at) FROM STDIN WITH (FORMAT BINARY)"
        ) as cp:
            cp.write(head)
            for a in range(0, n, chunk):
                ids = np.arange(a + 1, min(a + chunk, n) + 1, dtype=np.int64)
                rec = np.zeros(len(ids), it_dt)
                rec["nf"], rec["l1"], rec["id"], rec["l2"] = 6, 8, ids, 11
                rec["ext"] = np.array([f"syn-{i:07d}".encode() for i in ids.tolist()], dtype="S11")
                rec["l3"], rec["payload"], rec["l4"], rec["label"] = 1, b"\x00", 4, ids % 10
                rec["l5"], rec["cat"], rec["l6"], rec["uat"] = 8, now_us, 8, now_us
                cp.write(rec.tobytes())
            cp.write(tail)
        with cur.copy(
            "COPY embeddings (item_id, model_version, vector, created_at) FROM STDIN WITH (FORMAT BINARY)"
        ) as cp:
            cp.write(head)
            for a in range(0, n, chunk):
                ids = np.arange(a + 1, min(a + chunk, n) + 1, dtype=np.int64)
                rec = np.zeros(len(ids), em_dt)
                rec["nf"], rec["l1"], rec["item"], rec["l2"], rec["mv"] = 4, 8, ids, 2, b"v1"
                rec["l3"] = d * 4
                rec["vec"] = clustered(rng, len(ids), d, centers).astype("<f4").view(np.uint8).reshape(-1, d * 4)
                rec["l4"], rec["cat"] = 8, now_us
                cp.write(rec.tobytes())
            cp.write(tail)
        cur.execute("SELECT setval(pg_get_serial_sequence('items', 'id'), %s)", (n,))
        conn.commit()
        cur.execute("ANALYZE items")
        cur.execute("ANALYZE embeddings")
        conn.commit()
    return {"rows": n, "copy_seconds": time.perf_counter() - t0}


def recall_study(cfg: BenchConfig, n: int, d: int = 64) -> dict[str, Any]:
    """Flat vs IVF1024,Flat vs HNSW32 (the service's VectorIndex) on `n` clustered vectors: build time,
    recall@k against Flat, single-query latency and speed-up, at the FAISS defaults and a few settings."""
    import faiss

    from service.index import VectorIndex

    rng = np.random.default_rng(21)
    centers = unit_centers(d)
    vecs = np.concatenate([clustered(rng, min(100_000, n - a), d, centers) for a in range(0, n, 100_000)])
    ids = np.arange(1, n + 1, dtype=np.int64)
    n_q = cfg.q(200, 20)
    queries = clustered(np.random.default_rng(99), n_q, d, centers)
    k = cfg.k
    builds: dict[str, float] = {}
    indexes: dict[str, VectorIndex] = {}
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # builds use every core, as a start-up would
    for factory in ("Flat", "IVF1024,Flat", "HNSW32"):
        t0 = time.perf_counter()
        vi = VectorIndex(d, factory, space="v1")
        vi.add(ids, vecs)
        builds[factory] = time.perf_counter() - t0
        indexes[factory] = vi
    faiss.omp_set_num_threads(cfg.threads)
    del vecs

    def timed(vi: VectorIndex) -> tuple[np.ndarray, float]:
        out = np.empty((n_q, k), np.int64)
        ts = []
        for j in range(n_q):
            t0 = time.perf_counter()
            _, i = vi.search(queries[j : j + 1], k)
            ts.append(time.perf_counter() - t0)
            out[j] = i[0]
        return out, float(np.median(ts))

    truth, flat_t = timed(indexes["Flat"])
    rows = [
        {
            "index": "Flat",
            "setting": "exact",
            "build_s": builds["Flat"],
            "p50_ms": flat_t * 1000,
            "recall": 1.0,
            "speedup": 1.0,
        }
    ]
    settings: list[tuple[str, str, Callable[[Any, int], None], tuple[int, ...]]] = [
        ("IVF1024,Flat", "nprobe", lambda ix, v: setattr(ix, "nprobe", v), (1, 8, 32)),
        ("HNSW32", "efSearch", lambda ix, v: setattr(ix.hnsw, "efSearch", v), (16, 64, 128)),
    ]
    for factory, knob, setter, values in settings:
        vi = indexes[factory]
        inner = vi._index
        nlist = getattr(inner, "nlist", None)
        for v in values:
            setter(inner, v)
            got, t = timed(vi)
            rec = float(
                np.mean([len(set(g) & set(tr)) / k for g, tr in zip(got.tolist(), truth.tolist(), strict=True)])
            )
            rows.append(
                {
                    "index": factory if nlist is None else f"IVF{nlist},Flat",
                    "setting": f"{knob}={v}" + (" (default)" if v in (1, 16) else ""),
                    "build_s": builds[factory],
                    "p50_ms": t * 1000,
                    "recall": rec,
                    "speedup": flat_t / t,
                }
            )
    indexes.clear()
    gc.collect()
    return {
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
        r = _in_child(_child_rebuild, db_url, bsz)
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


# ------------------------------------------------------------------------------------------- reporting


def _f(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def summary_rows(res: dict[str, Any]) -> list[list[str]]:
    """[#, figure, measured, baseline, ratio, target, met]"""
    rows: list[list[str]] = []
    s = res["sections"]
    m = s.get("1", {})
    for r in m.get("rows", []):
        rows.append(
            [
                "1",
                f"merged vs one index: {r['data']}, {r['factory']}, batch {r['batch']} (p50)",
                f"{r['merged_p50_ms']:.3f} ms",
                f"{r['single_p50_ms']:.3f} ms",
                f"{r['ratio_p50']:.2f}",
                f"<= {MERGE_TARGET}",
                _ok(r["ratio_p50"], MERGE_TARGET),
            ]
        )
    e = s.get("2", {})
    for r in e.get("rows", []):
        rows.append(
            [
                "2",
                f"query encoding v2+psi vs v2+v1, batch {r['batch']} (p50; {e.get('artifacts')})",
                f"{r['single_pass_p50_ms']:.3f} ms",
                f"{r['two_pass_p50_ms']:.3f} ms",
                f"{r['ratio_p50']:.2f}",
                f"<= {ENCODE_TARGET}",
                _ok(r["ratio_p50"], ENCODE_TARGET),
            ]
        )
    if "rows" in e and not e["rows"]:
        rows.append(["2", "query encoding", "skipped: no artifacts", "", "", "", "n/a"])
    x = s.get("3", {})
    if "e2e_p50_ms" in x:
        rows.append(
            [
                "3",
                f"POST /search end to end vs bare FAISS searches ({x['gallery']:,} items, mid-rollout; p50)",
                f"{x['e2e_p50_ms']:.2f} ms",
                f"{x['bare_p50_ms']:.3f} ms",
                f"{x['ratio_p50']:.1f} (+{x['overhead_p50_ms']:.2f} ms)",
                "report",
                "-",
            ]
        )
    b = s.get("4", {})
    if "raw_encoder" in b:
        rows.append(
            [
                "4",
                f"backfill 1 worker vs raw batched encoder ({b['items']:,} items, {b['artifacts']})",
                f"{b['one_worker']['items_per_second']:.0f} items/s",
                f"{b['raw_encoder']['items_per_second']:.0f} items/s",
                f"{b['one_worker_vs_raw']:.2f}",
                f">= {WORKER_TARGET}",
                _ok(b["one_worker_vs_raw"], WORKER_TARGET, True),
            ]
        )
        rows.append(
            [
                "4",
                "backfill 2 workers vs 1 worker",
                f"{b['two_workers']['items_per_second']:.0f} items/s",
                f"{b['one_worker']['items_per_second']:.0f} items/s",
                f"{b['two_vs_one_worker']:.2f}",
                "report",
                "-",
            ]
        )
        pv = b.get("omp_passive")
        if pv:
            rows.append(
                [
                    "4",
                    "variant: workers with OMP_WAIT_POLICY=PASSIVE, 1 worker vs raw encoder",
                    f"{pv['one_worker']['items_per_second']:.0f} items/s",
                    f"{pv['raw_encoder']['items_per_second']:.0f} items/s",
                    f"{pv['one_worker_vs_raw']:.2f}",
                    f">= {WORKER_TARGET}",
                    _ok(pv["one_worker_vs_raw"], WORKER_TARGET, True),
                ]
            )
            rows.append(
                [
                    "4",
                    "variant: OMP_WAIT_POLICY=PASSIVE, 2 workers vs 1 worker",
                    f"{pv['two_workers']['items_per_second']:.0f} items/s",
                    f"{pv['one_worker']['items_per_second']:.0f} items/s",
                    f"{pv['two_vs_one_worker']:.2f}",
                    "report",
                    "-",
                ]
            )
    lag = s.get("5", {})
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
    h = s.get("6", {})
    if "faiss_curve_s" in h:
        rows.append(
            [
                "6",
                f"offline curve ({h['n']:,} items, 22 points) FAISS top-k vs dense matrix",
                f"{h['faiss_curve_s']:.1f} s",
                f"{h['dense_curve_s_extrapolated']:.1f} s (extrapolated)",
                f"{h['speedup']:.1f}x faster",
                "report",
                "-",
            ]
        )
    mem = s.get("7", {})
    if "ratio" in mem:
        rows.append(
            [
                "7",
                f"API index memory, {mem['items']:,} x d={mem['dim']} (RSS growth, fresh process)",
                f"{mem['bytes_per_item']:.0f} B/item",
                f"{mem['raw_bytes'] / mem['items']:.0f} B/item raw",
                f"{mem['ratio']:.2f}",
                f"<= {MEMORY_TARGET}",
                _ok(mem["ratio"], MEMORY_TARGET),
            ]
        )
    lg = s.get("8", {})
    if "rebuild" in lg:
        rb = lg["rebuild"]
        rows.append(
            [
                "8",
                f"start-up rebuild from Postgres, {lg['items']:,} rows (Flat)",
                f"{rb['seconds']:.1f} s",
                f"COPY load {lg['copy']['copy_seconds']:.1f} s",
                f"{rb['items_per_second']:.0f} rows/s",
                "report",
                "-",
            ]
        )
        rows.append(
            [
                "7/8",
                "API process memory after that rebuild (RSS growth)",
                f"{rb['memory_ratio'] * 256:.0f} B/item" if lg["dim"] == 64 else "-",
                "256 B/item raw",
                f"{rb['memory_ratio']:.2f}",
                f"<= {MEMORY_TARGET}",
                _ok(rb["memory_ratio"], MEMORY_TARGET),
            ]
        )
    if "recall" in lg:
        for r in lg["recall"]["rows"][1:]:
            rows.append(
                [
                    "8",
                    f"{r['index']} {r['setting']} vs Flat, {lg['items']:,} items (1 query)",
                    f"recall@10 {r['recall']:.3f}",
                    f"Flat {lg['recall']['rows'][0]['p50_ms']:.2f} ms",
                    f"{r['speedup']:.1f}x faster ({r['p50_ms']:.2f} ms)",
                    "report",
                    "-",
                ]
            )
    for key, sec in s.items():
        if "skipped" in sec or "error" in sec:
            rows.append([key, "section", sec.get("skipped") or f"error: {sec['error']}", "", "", "", "n/a"])
    return rows


def markdown(res: dict[str, Any]) -> str:
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
    lines += ["", "| # | figure | measured | baseline | ratio | target | met |", "|---|---|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(res)]
    s = res["sections"]
    x = s.get("3", {})
    if "stage_mean_ms" in x:
        st = x["stage_mean_ms"]
        lines += [
            "",
            f"## /search by stage (means over {x['queries']} requests, ms; {x['layout']})",
            "",
            "| client wall | HTTP + framework | handler total | decode | encode | search | merge | bare FAISS |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {_f(st.get('client_wall'))} | {_f(st.get('http_and_framework'))} | {_f(st.get('total'))} | "
            f"{_f(st.get('decode'))} | {_f(st.get('encode'))} | {_f(st.get('search'))} | {_f(st.get('merge'))} | "
            f"{_f(x['bare_mean_ms'])} |",
        ]
    m = s.get("1", {})
    if m.get("rows"):
        lines += [
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
        lines += [f"- {n}" for n in m.get("notes", [])]
    lg = s.get("8", {})
    if "recall" in lg:
        rc = lg["recall"]
        lines += [
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
    lines += ["", "Raw figures: `results.json` beside this file."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- run


def run_bench(cfg: BenchConfig, command: str = "backfill bench") -> dict[str, Any]:
    t_start = time.perf_counter()
    _set_threads(cfg.threads)
    res: dict[str, Any] = {
        "command": command,
        "quick": cfg.quick,
        "threads": cfg.threads,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "sections": {},
    }
    previous = cfg.out_dir / "results.json"
    if cfg.update and previous.is_file():
        old = json.loads(previous.read_text())
        for k, v in old.get("sections", {}).items():
            if int(k) not in cfg.only:  # each kept section carries the run that measured it
                v.setdefault("run", {"started": old.get("started"), "command": old.get("command")})
                res["sections"][k] = v
    scratch = Path(tempfile.mkdtemp(prefix="backfill-bench-"))
    need_art = {1, 2, 3, 5, 6} & set(cfg.only)
    art = find_artifacts(cfg, scratch) if need_art else None
    res["artifacts"] = art.label if art is not None else None
    sections = res["sections"]

    def save() -> None:
        res["seconds"] = time.perf_counter() - t_start
        snapshot = {**res, "sections": dict(sorted(sections.items()))}
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        (cfg.out_dir / "results.json").write_text(json.dumps(snapshot, indent=2, default=str))
        (cfg.out_dir / "results.md").write_text(markdown(snapshot))

    def guarded(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        typer.echo(f"[bench] section {key} ...", err=True)
        try:
            sections[key] = fn()
        except Exception as e:  # one failing section never loses the others
            traceback.print_exc()
            sections[key] = {"error": f"{type(e).__name__}: {e}"}
        sections[key]["section_seconds"] = round(time.perf_counter() - t0, 1)
        sections[key]["run"] = {"started": res["started"], "command": command}
        save()  # a later failure (or a kill) keeps what is measured so far
        typer.echo(f"[bench] section {key} done in {sections[key]['section_seconds']} s", err=True)

    if 1 in cfg.only:
        assert art is not None
        guarded("1", lambda: section_merge(cfg, art))
    if 2 in cfg.only:
        assert art is not None
        guarded("2", lambda: section_encode(cfg, art))
    if {3, 5} & set(cfg.only):
        assert art is not None
        try:
            with live_service(cfg, art, cfg.size("e2e_n")) as live:
                if 3 in cfg.only:
                    guarded("3", lambda: {**section_e2e(cfg, live), "artifacts": art.label})
                if 5 in cfg.only:
                    guarded("5", lambda: section_lag(cfg, live))
        except Exception as e:
            traceback.print_exc()
            for key in ("3", "5"):
                if int(key) in cfg.only and key not in sections:
                    sections[key] = {"error": f"service start: {type(e).__name__}: {e}"}
    if 4 in cfg.only:
        guarded("4", lambda: section_backfill(cfg))
    if 6 in cfg.only:
        assert art is not None
        guarded("6", lambda: section_harness(cfg, art))
    if 7 in cfg.only:
        guarded("7", lambda: section_memory(cfg))
    if 8 in cfg.only:
        guarded("8", lambda: section_large(cfg))
    save()
    res["sections"] = dict(sorted(sections.items()))
    return res


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        quick: bool = typer.Option(False, "--quick", help="Small sizes (seconds, not minutes)."),
        only: str = typer.Option(",".join(map(str, SECTIONS)), help="Sections to run, e.g. 1,2,7."),
        out: Path = typer.Option(REPO / "runs" / "bench", help="Output directory."),
        artifacts: Path = typer.Option(REPO / "artifacts", help="Artifacts directory (v1, v2, compat-v1-v2)."),
        pg: str = typer.Option(BenchConfig.pg, help="Postgres server URL (scratch databases are created there)."),
        redis_url: str = typer.Option(BenchConfig.redis, "--redis", help="Redis URL (this DB is flushed)."),
        threads: int = typer.Option(1, min=1, help="FAISS/torch threads for the timed searches."),
        wait_artifacts: float = typer.Option(0.0, help="Seconds to wait for the shipped artifacts to appear."),
        update: bool = typer.Option(False, "--update", help="Replace only the chosen sections of results.json."),
        synth_n: int | None = typer.Option(None, help="Synthetic vectors for section 1 (default 1M)."),
        large_n: int | None = typer.Option(None, help="Items for sections 7 and 8 (default 1M)."),
    ) -> None:
        """Measure every performance figure beside its baseline; writes results.json and results.md."""
        sel = tuple(sorted({int(x) for x in only.split(",") if x.strip()}))
        bad = [x for x in sel if x not in SECTIONS]
        if bad:
            raise typer.BadParameter(f"unknown sections {bad}; choose from {list(SECTIONS)}", param_hint="--only")
        cfg = BenchConfig(
            quick=quick,
            only=sel,
            out_dir=out,
            artifacts=artifacts,
            pg=pg,
            redis=redis_url,
            threads=threads,
            wait_artifacts=wait_artifacts,
            update=update,
            synth_n=synth_n,
            large_n=large_n,
        )
        res = run_bench(cfg, "backfill bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "backfill bench")
        typer.echo(markdown(res))
        typer.echo(f"wrote {out / 'results.json'} and {out / 'results.md'}")


__all__ = ["BenchConfig", "register", "run_bench"]
