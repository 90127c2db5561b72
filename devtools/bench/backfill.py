"""Section 4: backfill throughput, measured side by side in one run on this machine.

1. raw: the target encoder alone (`Encoder.embed`) over pre-decoded images in batches, in a spawned process
   like a worker's (same environment: OMP_WAIT_POLICY=PASSIVE from the `worker` package), at one torch thread
   and at one per core; the baseline is the faster of the two (the encoder's speed on this machine);
2. one worker: a rollout driven by one spawned worker process (claim, load, decode, embed, commit), with the
   worker's own thread policy (`worker.context.encoder_threads`: every core for one worker) and, as a
   variant, the previous policy (one torch thread fewer than the cores);
3. two workers: the same rollout shared by two worker processes (the policy: half the cores each).

Rounds interleave them (raw, worker rollouts, raw ...) and each worker figure is divided by the raw windows
on either side of it, so a load change on a shared host moves both. Before the rounds: a serial per-stage
profile (claim, payload load, decode + fit, encode, commit, embedding write, event) of the shipped stages
(`worker.pipeline`) and of the reference ones (`worker.backfill`) on the same gallery, and the raw encoder
at batch sizes 32 to 4,096.

Targets: (2) / (1) >= 0.9 and (3) / (2) >= 1.0. Uses the shipped artifacts (artifacts/v1, v2, compat-v1-v2)
and Fashion-MNIST when present, else stand-ins: the shipped CNN architectures (models.encoders.CNNEncoder
with models.train's v1/v2 configs) with random weights (the report says which). Needs Postgres and Redis (a
scratch database is created and dropped). Standalone, it prints markdown tables and writes
runs/bench/backfill.json:

    .venv/bin/python -m devtools.bench.backfill [--items 5000] [--batch-size 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from devtools.bench.config import REPO, BenchConfig
from devtools.fakes import seed_gallery, standin_artifacts
from models.artifacts import discover, load_encoder
from models.preprocess import decode, preprocess
from service import events
from service import rollouts as domain
from service.config import Settings
from service.db import Embedding, Item, ModelVersion, Rollout, make_engine, make_sessionmaker
from service.db.migrate import upgrade_head
from worker import backfill, context, driver, pipeline, plan
from worker.stages import STAGES, StageClock

__all__ = ["drive", "main", "raw_encode", "rollout", "run", "section_backfill"]

ONE_TARGET, TWO_TARGET = 0.9, 1.0
SCAN_BATCHES = (32, 64, 128, 256, 512, 1024, 4096)


# --- spawned processes ----------------------------------------------------------------------------------
def drive(settings_json: str, rollout_id: int, threads: int, workers: int, barrier: Any, out: Any) -> None:
    """One of `workers` worker processes on this host: the worker's thread policy (or `threads` torch threads
    when > 0), the model loaded once, wait for the start signal, drive until the rollout ends. (Spawned:
    imported by name.)"""
    import torch

    n = context.apply_thread_policy(workers) if threads <= 0 else threads
    torch.set_num_threads(n)
    settings = Settings.model_validate_json(settings_json)
    ctx = context.configure(settings)
    with ctx.sessionmaker() as s:
        ctx.encoder(s.get(ModelVersion, "v2"))  # type: ignore[arg-type]  # loaded once per process
    ctx.stages = StageClock()  # busy seconds per stage; stages on different threads overlap
    barrier.wait()
    t0, cpu0 = time.perf_counter(), time.process_time()
    summary = driver.drive(ctx, rollout_id)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    report = {"pid": os.getpid(), "items": len(summary.embedded), "seconds": seconds, "cpu_seconds": cpu}
    out.put({**report, "torch_threads": n, "stages": ctx.stages.snapshot()})


def raw_encode(
    encoder_dir: str, images: np.ndarray, batches: list[int], threads: int, seconds: float, out: Any
) -> None:
    """The raw batched encoder in a fresh process: items/s at each batch size, `threads` torch threads.
    (Spawned: imported by name.)"""
    import torch

    import worker  # noqa: F401  # the worker package's OMP_WAIT_POLICY default, as in a worker process

    torch.set_num_threads(threads)
    enc = load_encoder(Path(encoder_dir))
    enc.embed(images[: max(batches)], batch_size=max(batches))  # warm-up
    res: dict[int, float] = {}
    for bs in batches:
        done, t0 = 0, time.perf_counter()
        while True:
            for k in range(0, len(images) - bs + 1, bs):
                done += len(enc.embed(images[k : k + bs], batch_size=bs))
            if time.perf_counter() - t0 >= seconds:
                break
        res[bs] = done / (time.perf_counter() - t0)
    out.put({"threads": threads, "items_per_second": res})


def _collect(procs: list[Any], out: Any, timeout: float = 1800) -> list[dict[str, Any]]:
    """Every process's report; never waits on a process that died (e.g. the database went away)."""
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"bench process failed (exit codes {dead}) or timed out") from None
    return results


def raw(encoder_dir: Path, images: np.ndarray, batches: list[int], threads: int, seconds: float) -> dict[int, float]:
    mpc = mp.get_context("spawn")
    out = mpc.Queue()
    p = mpc.Process(target=raw_encode, args=(str(encoder_dir), images, batches, threads, seconds, out))
    p.start()
    res = _collect([p], out)[0]["items_per_second"]
    p.join()
    return {int(k): float(v) for k, v in res.items()}


# --- serial stage profile -------------------------------------------------------------------------------
def _reference_batch(ctx: context.WorkerContext, rollout: Rollout, n: int, clock: StageClock) -> int:
    """One batch through `worker.backfill`'s stages, each timed; the items it embedded."""
    with ctx.sessionmaker() as s, clock.time("claim"):
        claimed = backfill.claim(s, ctx, rollout.id, n)
    if not claimed.tasks:
        return -1
    with ctx.sessionmaker() as s, clock.time("load"):
        rows = s.execute(sa.select(Item.id, Item.payload).where(Item.id.in_(list(claimed.tasks.values())))).all()
    with clock.time("decode", len(rows)):
        images, ids = [decode(p) for _, p in rows], [int(i) for i, _ in rows]
    with ctx.sessionmaker() as s:
        enc = ctx.encoder(s.get(ModelVersion, rollout.to_version))  # type: ignore[arg-type]
    with clock.time("encode", len(ids)):  # fitting to the input spec happens inside embed here
        vectors = dict(zip(ids, enc.embed(images, batch_size=len(ids)), strict=True))
    with ctx.sessionmaker() as s, clock.time("commit", len(ids)):
        res = backfill.commit_batch(s, ctx, rollout, claimed, vectors, {})
    with clock.time("event"):
        events.publish(ctx.redis, events.EMBEDDINGS, rollout_id=rollout.id, count=len(res.embedded))
    return len(res.embedded)


def _pipeline_batch(ctx: context.WorkerContext, rollout: Rollout, n: int, clock: StageClock) -> int:
    """One batch through `worker.pipeline`'s stages (they time themselves into ctx.stages), serially."""
    prep = pipeline.load_batch(ctx, rollout, n)
    if not prep.claimed.tasks:
        return -1
    return len(pipeline.finish_loaded(ctx, rollout, prep, pipeline.encode_loaded(ctx, rollout, prep)).embedded)


def _write_timer(engine: sa.Engine, clock: StageClock) -> Any:
    """Time the embeddings INSERT statements into `clock` as stage "write" (the reference path's)."""

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith("INSERT INTO embeddings"):
            clock.add("write", time.perf_counter() - conn.info.pop("bench_t0", time.perf_counter()))

    sa.event.listen(engine, "before_cursor_execute", before)
    sa.event.listen(engine, "after_cursor_execute", after)

    def undo() -> None:
        sa.event.remove(engine, "before_cursor_execute", before)
        sa.event.remove(engine, "after_cursor_execute", after)

    return undo


def stage_profile(settings: Settings, maker: Any, batch_size: int) -> dict[str, Any]:
    """Both paths over the whole gallery, one stage after another (one torch thread, this process): seconds
    per stage and in all, as microseconds per item embedded."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ctx: context.WorkerContext | None = None
    out: dict[str, Any] = {}
    try:
        for name, step in (("reference", _reference_batch), ("pipeline", _pipeline_batch)):
            rid = fresh_rollout(settings, maker, batch_size)  # configures this process's worker context
            ctx = context.get_context()
            clock = StageClock()
            ctx.stages = clock
            undo = _write_timer(ctx.sessionmaker.kw["bind"], clock) if name == "reference" else lambda: None
            with maker() as s:
                ro = s.get(Rollout, rid)
                assert ro is not None
                s.expunge(ro)
            done, t0 = 0, time.perf_counter()
            while (k := step(ctx, ro, batch_size, clock)) >= 0:
                done += k
            wall = time.perf_counter() - t0
            undo()
            with maker() as s:
                assert domain.complete(s, settings, rid, r=ctx.redis) is not None  # the next rollout may start
            us = {k: v["seconds"] * 1e6 / max(done, 1) for k, v in clock.snapshot().items()}
            out[name] = {"items": done, "seconds": wall, "items_per_second": done / wall, "us_per_item": us}
    finally:
        if ctx is not None:
            ctx.stages = None
        torch.set_num_threads(threads)
    return out


# --- rollouts -------------------------------------------------------------------------------------------
def fresh_rollout(settings: Settings, maker: Any, batch_size: int) -> int:
    """A new planned, running rollout v1 -> v2 over the whole gallery (earlier v2 vectors deleted)."""
    with maker() as s:
        s.execute(sa.delete(Embedding).where(Embedding.model_version == "v2"))
        s.execute(sa.update(ModelVersion).where(ModelVersion.name == "v1").values(status="serving"))
        s.execute(sa.update(ModelVersion).where(ModelVersion.name == "v2").values(status="registered"))
        s.commit()
        rid = domain.create_rollout(s, settings, to="v2", policy="uncertainty", batch_size=batch_size).id
    context.configure(settings)
    plan.plan_rollout(rid)
    return rid


def rollout(settings: Settings, maker: Any, workers: int, batch_size: int, threads: int = 0) -> dict[str, Any]:
    """A fresh rollout v1 -> v2 driven by `workers` spawned worker processes; its items/s."""
    rid = fresh_rollout(settings, maker, batch_size)
    mpc = mp.get_context("spawn")  # never fork a process that may hold CUDA or DB connections
    barrier, out = mpc.Barrier(workers + 1), mpc.Queue()
    args = (settings.model_dump_json(), rid, threads, workers, barrier, out)
    procs = [mpc.Process(target=drive, args=args) for _ in range(workers)]
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
        "torch_threads": results[0]["torch_threads"],
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


def _rounds(
    settings: Settings, maker: Any, encoder_dir: Path, decoded: np.ndarray, batch_size: int, rounds: int
) -> dict[str, Any]:
    """Interleaved rounds: raw windows (1 thread, one per core), one worker (thread policy), one worker with
    the previous policy (a torch thread fewer than the cores), two workers; raw windows once more at the end."""
    cores = os.cpu_count() or 1
    seconds = 1.5

    def raw_window() -> dict[str, float]:
        w = {f"{t}t": raw(encoder_dir, decoded, [batch_size], t, seconds)[batch_size] for t in sorted({1, cores})}
        return {**w, "best": max(w.values())}

    windows, out = [raw_window()], []
    for _ in range(rounds):
        one = rollout(settings, maker, 1, batch_size)
        fewer = rollout(settings, maker, 1, batch_size, threads=max(1, cores - 1))
        two = rollout(settings, maker, 2, batch_size)
        windows.append(raw_window())
        base = max(windows[-2]["best"], windows[-1]["best"])  # the conservative baseline: the faster window
        out.append(
            {
                "raw_before": windows[-2],
                "raw_after": windows[-1],
                "raw_baseline": base,
                "one_worker": one,
                "one_worker_fewer_threads": fewer,
                "two_workers": two,
                "one_vs_raw": one["items_per_second"] / base,
                "one_fewer_threads_vs_raw": fewer["items_per_second"] / base,
                "two_vs_one": two["items_per_second"] / one["items_per_second"],
            }
        )
    med = {k: statistics.median(r[k] for r in out) for k in ("one_vs_raw", "one_fewer_threads_vs_raw", "two_vs_one")}
    return {"rounds": out, "median": med}


def _measure(
    settings: Settings, artifacts: dict[str, Path], items: int, batch_size: int, fashion: bool, rounds: int
) -> dict[str, Any]:
    """On a migrated, empty database: seed the gallery; stage profile, batch-size scan, interleaved rounds."""
    images = _images(items, fashion, settings)
    engine = make_engine(settings)
    maker = make_sessionmaker(engine)
    with maker() as s:
        seed_gallery(s, artifacts, items, images=images)
    try:
        decoded = np.stack([preprocess(x) for x in images])  # what raw gets: no PNG decode, no DB
        stages = stage_profile(settings, maker, batch_size)
        scan = raw(artifacts["v2"], decoded, [b for b in SCAN_BATCHES if b <= items], 1, 1.0)
        measured = _rounds(settings, maker, artifacts["v2"], decoded, batch_size, rounds)
    finally:
        engine.dispose()
    return {"stages": stages, "batch_scan_1_thread": scan, **measured}


def run(
    items: int = 5000,
    batch_size: int = 256,
    artifacts_dir: Path = REPO / "artifacts",
    pg: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    redis_url: str = "redis://127.0.0.1:6379/14",
    out: Path | None = REPO / "runs" / "bench" / "backfill.json",
    rounds: int = 3,
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
    load_start = [round(x, 2) for x in os.getloadavg()]
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
        measured = _measure(settings, artifacts, items, batch_size, fashion, rounds)
    finally:
        drop_database(server, db_url)
    report = {
        "artifacts": "shipped" if shipped else "stand-in: shipped CNN architectures, random weights",
        "data": "fashion-mnist t10k" if fashion else "sklearn digits (upscaled)",
        "items": items,
        "batch_size": batch_size,
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "cpus": os.cpu_count(),
        "worker_torch_threads": context.encoder_threads(),  # one worker on this host
        "machine": platform.platform(),
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        **measured,
    }
    report.update(_headline(report))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    """The targets, and the round with the median one-worker ratio in the keys older reports used."""
    rounds = sorted(report["rounds"], key=lambda r: r["one_vs_raw"])
    mid = rounds[len(rounds) // 2]
    return {
        "targets": {"one": ONE_TARGET, "two": TWO_TARGET},
        "raw_encoder": {"items_per_second": mid["raw_baseline"]},
        "one_worker": mid["one_worker"],
        "two_workers": mid["two_workers"],
        "one_worker_vs_raw": mid["one_vs_raw"],
        "two_vs_one_worker": mid["two_vs_one"],
    }


def section_backfill(cfg: BenchConfig) -> dict[str, Any]:
    """The throughput section of `backfill bench` (see the module docstring)."""
    from devtools.scratch_db import server_url

    server = server_url(cfg.pg)
    redis_url = cfg.redis.rsplit("/", 1)[0] + "/14"
    args = (cfg.size("backfill_items"), 256, cfg.artifacts, server.render_as_string(hide_password=False), redis_url)
    return run(*args, cfg.out_dir / "backfill.json", rounds=cfg.q(3, 1))


def print_report(report: dict[str, Any]) -> None:
    """Markdown tables of a report (the standalone command's output)."""
    print(
        f"Backfill ({report['artifacts']}, {report['data']}, {report['items']} items, batch {report['batch_size']}, "
        f"{report['device']}, {report['cpus']} CPUs, worker torch threads {report['worker_torch_threads']}, "
        f"load average {report['load_average']})\n"
    )
    st = report["stages"]
    names = [k for k in STAGES if k in st["reference"]["us_per_item"] or k in st["pipeline"]["us_per_item"]]
    print("| serial stage profile (us/item) | " + " | ".join(names) + " | wall | items/s |")
    print("|---|" + "---:|" * (len(names) + 2))
    for path in ("reference", "pipeline"):
        p = st[path]
        cells = [f"{p['us_per_item'].get(k, 0.0):.1f}" for k in names]
        print(
            f"| {path} | "
            + " | ".join(cells)
            + f" | {p['seconds'] * 1e6 / max(p['items'], 1):.1f} | {p['items_per_second']:.0f} |"
        )
    print("\n| raw encoder, 1 thread, batch | " + " | ".join(str(b) for b in report["batch_scan_1_thread"]) + " |")
    print("|---|" + "---:|" * len(report["batch_scan_1_thread"]))
    print("| items/s | " + " | ".join(f"{v:.0f}" for v in report["batch_scan_1_thread"].values()) + " |")
    print(
        "\n| round | raw (1t / all t, before -> after) | 1 worker | 1 worker, a thread fewer | 2 workers"
        " | 1w/raw | 1w fewer/raw | 2w/1w |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(report["rounds"], 1):
        b, a = r["raw_before"], r["raw_after"]
        raw_s = " / ".join(f"{b[k]:.0f}->{a[k]:.0f}" for k in b if k != "best")
        print(
            f"| {i} | {raw_s} | {r['one_worker']['items_per_second']:.0f} | "
            f"{r['one_worker_fewer_threads']['items_per_second']:.0f} | {r['two_workers']['items_per_second']:.0f} | "
            f"{r['one_vs_raw']:.2f} | {r['one_fewer_threads_vs_raw']:.2f} | {r['two_vs_one']:.2f} |"
        )
    for key in ("one_worker", "one_worker_fewer_threads", "two_workers"):
        w = report["rounds"][0][key]["per_worker"][0]
        per = 1e6 / max(w["items"], 1)
        busy = ", ".join(
            f"{k} {v['seconds'] * per:.0f} ({v.get('cpu_seconds', 0.0) * per:.0f} CPU)" for k, v in w["stages"].items()
        )
        encoding = w["stages"].get("encode", {}).get("seconds", 0.0) / max(w["seconds"], 1e-9)
        print(
            f"\nround 1, {key} ({w['torch_threads']} torch threads): wall {w['seconds'] * 1e6 / max(w['items'], 1):.0f}"
            f" us/item, process CPU {w['cpu_seconds'] * 1e6 / max(w['items'], 1):.0f} us/item; busy us/item (of which"
            f" the stage's thread's CPU): {busy};"
            f" the encoder ran {encoding:.0%} of the wall"
        )
    m = report["median"]
    print(
        f"\nmedian: 1 worker / raw {m['one_vs_raw']:.2f} (target >= {ONE_TARGET}), "
        f"a thread fewer {m['one_fewer_threads_vs_raw']:.2f}; "
        f"2 workers / 1 {m['two_vs_one']:.2f} (target >= {TWO_TARGET})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    p.add_argument(
        "--pg",
        default=os.environ.get("BACKFILL_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    )
    p.add_argument("--redis", default=os.environ.get("BACKFILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/14"))
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "backfill.json")
    a = p.parse_args()
    report = run(a.items, a.batch_size, a.artifacts, a.pg, a.redis, a.out, a.rounds)
    print_report(report)
    print(f"\nwritten {a.out}")


if __name__ == "__main__":
    main()
