"""Section 4: backfill throughput, measured side by side in one run on this machine:

1. raw: the target encoder alone over pre-decoded images in batches (`Encoder.embed`), items/s;
2. one worker: a rollout driven by one worker process (claim, load, decode, embed, commit), items/s;
3. two workers: the same rollout shared by two worker processes, items/s.

Targets: (2) / (1) >= 0.8, and (3) / (2) reported. Uses the shipped artifacts (artifacts/v1, v2,
compat-v1-v2) and Fashion-MNIST when present, else stand-ins: the shipped CNN architectures
(models.encoders.CNNEncoder with models.train's v1/v2 configs) with random weights (the report says which).
Needs Postgres and Redis (a scratch database is created and dropped). The section runs it as shipped, then
once more with OMP_WAIT_POLICY=PASSIVE in the worker processes. Standalone, it prints a markdown table and
writes runs/bench/backfill.json:

    .venv/bin/python -m devtools.bench.backfill [--items 5000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import time
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from devtools.bench.common import set_threads
from devtools.bench.config import REPO, BenchConfig
from devtools.fakes import seed_gallery, standin_artifacts
from models.artifacts import discover, load_encoder
from models.preprocess import preprocess
from service import rollouts as domain
from service.config import Settings
from service.db import Embedding, ModelVersion, make_engine, make_sessionmaker
from service.db.migrate import upgrade_head
from worker import context, driver, plan

__all__ = ["drive", "main", "rollout", "run", "section_backfill"]


def drive(settings_json: str, rollout_id: int, barrier: Any, out: Any) -> None:
    """One worker process: load the model once, wait for the start signal, drive until the rollout ends.

    The target of the spawned worker processes: they import it as `devtools.bench.backfill.drive`."""
    settings = Settings.model_validate_json(settings_json)
    ctx = context.configure(settings)
    with ctx.sessionmaker() as s:
        ctx.encoder(s.get(ModelVersion, "v2"))  # type: ignore[arg-type]  # loaded once per process
    barrier.wait()
    t0 = time.perf_counter()
    summary = driver.drive(ctx, rollout_id)
    out.put({"pid": os.getpid(), "items": len(summary.embedded), "seconds": time.perf_counter() - t0})


def _collect(procs: list[Any], out: Any) -> list[dict[str, Any]]:
    """Every worker's report; never waits on a worker that died (e.g. the database went away)."""
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + 1800
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"backfill worker process failed (exit codes {dead}) or timed out") from None
    return results


def rollout(settings: Settings, maker: Any, workers: int, batch_size: int) -> dict[str, Any]:
    """A fresh rollout v1 -> v2 driven by `workers` spawned worker processes; its items/s."""
    with maker() as s:
        s.execute(sa.delete(Embedding).where(Embedding.model_version == "v2"))
        s.execute(sa.update(ModelVersion).where(ModelVersion.name == "v1").values(status="serving"))
        s.execute(sa.update(ModelVersion).where(ModelVersion.name == "v2").values(status="registered"))
        s.commit()
        rid = domain.create_rollout(s, settings, to="v2", policy="uncertainty", batch_size=batch_size).id
    context.configure(settings)
    plan.plan_rollout(rid)
    mpc = mp.get_context("spawn")  # never fork a process that may hold CUDA or DB connections
    barrier, out = mpc.Barrier(workers + 1), mpc.Queue()
    procs = [mpc.Process(target=drive, args=(settings.model_dump_json(), rid, barrier, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    results = _collect(procs, out)
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    with maker() as s:
        r = domain.get_rollout(s, rid)
        n = s.scalar(sa.select(sa.func.count()).where(Embedding.model_version == "v2"))
        assert r.status == "completed", r.status
    return {
        "workers": workers,
        "items": int(n or 0),
        "seconds": wall,
        "items_per_second": (n or 0) / wall,
        "per_worker": results,
    }


def _images(n: int, fashion: bool, settings: Settings) -> np.ndarray:
    if fashion:
        import gzip

        path = settings.fashion_mnist_dir / "t10k-images-idx3-ubyte.gz"
        with gzip.open(path) as f:
            data = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        return data[np.arange(n) % len(data)]
    from devtools.fakes import gallery_images

    return gallery_images(n)


def _raw(encoder_dir: Path, images: np.ndarray, batch_size: int, min_seconds: float = 3.0) -> dict[str, Any]:
    enc = load_encoder(encoder_dir)
    enc.embed(images[:batch_size])  # warm-up
    done, t0 = 0, time.perf_counter()
    while True:
        for k in range(0, len(images), batch_size):
            done += len(enc.embed(images[k : k + batch_size], batch_size=batch_size))
        if time.perf_counter() - t0 >= min_seconds:
            break
    dt = time.perf_counter() - t0
    return {"items": done, "seconds": dt, "items_per_second": done / dt}


def _measure(
    settings: Settings, artifacts: dict[str, Path], items: int, batch_size: int, fashion: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """On a migrated, empty database: seed the gallery; (raw encoder, one worker, two workers)."""
    images = _images(items, fashion, settings)
    engine = make_engine(settings)
    maker = make_sessionmaker(engine)
    with maker() as s:
        seed_gallery(s, artifacts, items, images=images)
    decoded = np.stack([preprocess(x) for x in images])  # what raw gets: no PNG decode, no DB
    raw_before = _raw(artifacts["v2"], decoded, batch_size)
    one = rollout(settings, maker, 1, batch_size)
    two = rollout(settings, maker, 2, batch_size)
    raw_after = _raw(artifacts["v2"], decoded, batch_size)
    # On a shared host the encoder's speed drifts: the better of a window before and one after the
    # rollouts is the baseline (the conservative choice for "worker / raw").
    raw = max(raw_before, raw_after, key=lambda r: r["items_per_second"])
    raw = {**raw, "before": raw_before["items_per_second"], "after": raw_after["items_per_second"]}
    engine.dispose()
    return raw, one, two


def run(
    items: int = 5000,
    batch_size: int = 256,
    artifacts_dir: Path = REPO / "artifacts",
    pg: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    redis_url: str = "redis://127.0.0.1:6379/14",
    out: Path | None = REPO / "runs" / "bench" / "backfill.json",
) -> dict[str, Any]:
    """Raw encoder vs one worker vs two workers on a scratch database (created and dropped); the report."""
    import redis
    import torch

    from devtools.scratch_db import create_database, drop_database

    encoders, packs = discover(artifacts_dir)
    shipped = {"v1", "v2"} <= set(encoders) and ("v1", "v2") in packs
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-backfill-{os.getpid()}"
    if shipped:
        artifacts = {"v1": encoders["v1"], "v2": encoders["v2"], "compat": packs[("v1", "v2")]}
        art_dir = artifacts_dir
    else:
        art_dir = scratch / "artifacts"
        artifacts = standin_artifacts(art_dir)
    server = sa.engine.make_url(pg)
    db_url = create_database(server, "bench_backfill")
    try:
        settings = Settings(
            database_url=db_url.render_as_string(hide_password=False),
            redis_url=redis_url,
            artifacts_dir=art_dir,
            data_dir=scratch / "data",
            metrics_port=0,
            log_level="WARNING",
        )
        redis.Redis.from_url(redis_url).flushdb()
        upgrade_head(settings)
        fashion = shipped and (settings.fashion_mnist_dir / "t10k-images-idx3-ubyte.gz").is_file()
        raw, one, two = _measure(settings, artifacts, items, batch_size, fashion)
    finally:
        drop_database(server, db_url)
    report = {
        "artifacts": "shipped" if shipped else "stand-in: shipped CNN architectures, random weights",
        "data": "fashion-mnist t10k" if fashion else "sklearn digits (upscaled)",
        "items": items,
        "batch_size": batch_size,
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "raw_encoder": raw,
        "one_worker": one,
        "two_workers": two,
        "one_worker_vs_raw": one["items_per_second"] / raw["items_per_second"],
        "two_vs_one_worker": two["items_per_second"] / one["items_per_second"],
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def section_backfill(cfg: BenchConfig) -> dict[str, Any]:
    """The throughput run as shipped, then once more with OMP_WAIT_POLICY=PASSIVE in the worker processes
    (a variant: torch's spinning OpenMP threads otherwise take the cores the worker's I/O thread and
    Postgres need on a small host)."""
    from devtools.scratch_db import server_url

    server = server_url(cfg.pg)
    redis_url = cfg.redis.rsplit("/", 1)[0] + "/14"
    cores = os.cpu_count() or 1
    args = (cfg.size("backfill_items"), 256, cfg.artifacts, server.render_as_string(hide_password=False), redis_url)
    set_threads(cores)  # raw gets the same torch threads the spawned workers get by default
    saved = os.environ.get("OMP_WAIT_POLICY")
    try:
        rep: dict[str, Any] = run(*args, cfg.out_dir / "backfill.json")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read by the spawned workers' OpenMP runtime at start
        passive = run(*args, cfg.out_dir / "backfill-omp-passive.json")
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = saved
        set_threads(cfg.threads)
    rep["omp_passive"] = {
        "raw_encoder": passive["raw_encoder"],
        "one_worker": passive["one_worker"],
        "two_workers": passive["two_workers"],
        "one_worker_vs_raw": passive["one_worker_vs_raw"],
        "two_vs_one_worker": passive["two_vs_one_worker"],
    }
    return rep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    p.add_argument(
        "--pg",
        default=os.environ.get("BACKFILL_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    )
    p.add_argument("--redis", default=os.environ.get("BACKFILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/14"))
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "backfill.json")
    a = p.parse_args()
    report = run(a.items, a.batch_size, a.artifacts, a.pg, a.redis, a.out)
    raw, one, two = report["raw_encoder"], report["one_worker"], report["two_workers"]
    print(
        f"Backfill throughput ({report['artifacts']}, {report['data']}, {a.items} items, "
        f"batch {a.batch_size}, {report['device']}, {report['cpus']} CPUs)\n"
    )
    print("| measurement | items/s | ratio |")
    print("|---|---:|---:|")
    print(f"| raw encoder (pre-decoded, batched) | {raw['items_per_second']:.0f} | 1.00 |")
    print(
        f"| backfill, 1 worker | {one['items_per_second']:.0f} | "
        f"{report['one_worker_vs_raw']:.2f} of raw (target >= 0.80) |"
    )
    ratio2 = report["two_vs_one_worker"]
    print(f"| backfill, 2 workers | {two['items_per_second']:.0f} | {ratio2:.2f}x one worker |")
    print(f"\nwritten {a.out}")


if __name__ == "__main__":
    main()
