"""`backfill demo`: watch a model upgrade happen live, measured the way an application sees it.

Starts the API and one worker as subprocesses on the embedded defaults (SQLite + embedded Redis; Postgres
and Redis instead when BACKFILL_DATABASE_URL / BACKFILL_REDIS_URL are set), loads Fashion-MNIST test
images through POST /items with v1 serving, starts POST /upgrade to v2, and while the backfill runs pauses
it at each measuring point and measures retrieval quality through POST /search/batch. The same point is
computed offline by the evaluation harness for exactly the set of items the service had backfilled, so the
two curves can be compared point for point. Writes runs/demo/curve.json and curve.png.
"""

from __future__ import annotations

import base64
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import typer
from tqdm import tqdm

from devtools.demo_report import table, write_outputs
from service.config import REPO_ROOT, Settings, get_settings

DEMO_TOKEN = "demo-operator-token-0123456789"


@dataclass
class Point:
    fraction: float
    done: int
    total: int
    live_map: float
    live_top1: float
    offline_map: float
    offline_top1: float
    seconds: float
    path: str = "-"  # the query path serving at this point ("-" once completed)


@dataclass
class DemoResult:
    items: int
    mode: str
    policy: str
    old_old: float
    new_new: float
    points: list[Point] = field(default_factory=list)
    seconds: float = 0.0
    pair: str = "v1->v2"
    path_reason: str = ""
    predicted: dict[str, Any] | None = None  # the pack's predicted curve for the chosen path (its probe set)
    guard: dict[str, Any] | None = None  # set when the live guard paused the rollout and fell back
    training: dict[str, Any] | None = None  # the training phase, when the pair had no compat pack

    @property
    def auc(self) -> float:
        return float(np.mean([p.live_map for p in self.points])) if self.points else float("nan")

    def predicted_at(self, fraction: float) -> float | None:
        """The pack's predicted mAP for the chosen schedule (on its probe set), interpolated at `fraction`
        as the service does (`service.probe.predicted_margin`); None without a prediction."""
        if not self.predicted or not self.predicted.get("map"):
            return None
        pred = np.asarray(self.predicted["map"], dtype=np.float64)
        return float(np.interp(fraction, np.linspace(0.0, 1.0, len(pred)), pred))

    def predicted_gap(self) -> float | None:
        """Largest |predicted - live| mAP over the points; None without a prediction."""
        gaps = [abs(v - p.live_map) for p in self.points if (v := self.predicted_at(p.fraction)) is not None]
        return float(max(gaps)) if gaps else None

    def summary(self) -> dict[str, Any]:
        live = [p.live_map for p in self.points]
        flips = [b - a for a, b in itertools.pairwise(live)]
        span = self.new_new - self.old_old
        return {
            "auc": self.auc,
            "relative_gain": (self.auc - self.old_old) / span if span else float("nan"),
            "largest_negative_flip": min([0.0, *flips]),
            "lowest_vs_old_old": min(live, default=self.old_old) - self.old_old,
            "max_live_offline_gap": max((abs(p.live_map - p.offline_map) for p in self.points), default=0.0),
            "max_predicted_live_gap": self.predicted_gap(),
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _b64(img: np.ndarray) -> str:
    from models.preprocess import encode_png

    return base64.b64encode(encode_png(img)).decode()


class Stack:
    """The API and worker subprocesses, started on the same settings."""

    def __init__(self, env: dict[str, str], port: int, log_dir: Path) -> None:
        self.env, self.port, self.log_dir = env, port, log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = f"http://127.0.0.1:{port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        p = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def start_api(self) -> None:
        self._spawn("api", ["serve", "--host", "127.0.0.1", "--port", str(self.port)])

    def start_worker(self) -> None:
        self._spawn("worker", ["worker"])

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


class Client:
    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=120.0)
        self.auth = {"Authorization": f"Bearer {token}"}

    def wait_ready(self, timeout: float = 180.0, procs: list[subprocess.Popen[bytes]] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if procs and any(p.poll() is not None for p in procs):
                raise RuntimeError("a demo process exited early; see its log in the demo folder")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError("the API did not become ready")

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self.http.post(path, json=body or {}, headers=self.auth)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def rollout(self, rid: int) -> dict[str, Any]:
        r = self.http.get(f"/rollouts/{rid}")
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def search_all(self, payloads: list[str], k: int, batch: int = 250) -> tuple[list[list[str]], dict[str, Any]]:
        ranked: list[list[str]] = []
        serving: dict[str, Any] = {}
        for i in range(0, len(payloads), batch):
            r = self.http.post(
                "/search/batch", json={"queries": [{"image_b64": p} for p in payloads[i : i + batch]], "k": k}
            )
            r.raise_for_status()
            body = r.json()
            ranked.extend([h["id"] for h in hits] for hits in body["results"])
            serving = body["serving"]
        return ranked, serving


def _wait_ingested(
    client: Client, payload: str, want_fraction: float, want_mode: str | None, timeout: float = 60.0
) -> dict[str, Any]:
    """Wait until the API serves the rollout's path (`want_mode`; None once completed) and reports the
    backfilled fraction the database has (0 on the old-only path, which searches no NEW side)."""
    if want_mode == "old-only":
        want_fraction = 0.0
    deadline = time.monotonic() + timeout
    serving: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = client.http.post("/search", json={"image_b64": payload, "k": 1})
        r.raise_for_status()
        serving = r.json()["serving"]
        same_path = serving.get("mode") == want_mode
        if same_path and abs(float(serving.get("backfilled_fraction") or 0.0) - want_fraction) < 1e-9:
            return serving
        time.sleep(0.1)
    raise TimeoutError(f"ingestion did not catch up: API reports {serving}, database {want_fraction}")


def _stack_env(settings: Settings, data_dir: Path, old: str = "v1") -> dict[str, str]:
    """The environment of the demo's API and worker processes (no BACKFILL_* variable of ours leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
    env.update(
        BACKFILL_DATA_DIR=str(data_dir),
        BACKFILL_OPERATOR_TOKEN=DEMO_TOKEN,
        BACKFILL_ARTIFACTS_DIR=str(settings.artifacts_dir),
        BACKFILL_DEFAULT_MODEL=old,
        BACKFILL_FASHION_MNIST_DIR=str(settings.fashion_mnist_dir),
        BACKFILL_INGEST_POLL_SECONDS="0.1",
        BACKFILL_METRICS_PORT="0",
        BACKFILL_LOG_LEVEL="WARNING",
        BACKFILL_MAX_K="128",  # leave-one-out needs k + 1
        BACKFILL_TRAIN_SAMPLE=str(settings.train_sample),
    )
    if settings.index_backend != "faiss":  # the demo on another index backend (issue 19)
        env["BACKFILL_INDEX_BACKEND"] = settings.index_backend
        if settings.milvus_uri:
            env["BACKFILL_MILVUS_URI"] = settings.milvus_uri
    if settings.database_url:
        env["BACKFILL_DATABASE_URL"] = settings.database_url
    if settings.redis_url:
        env["BACKFILL_REDIS_URL"] = settings.redis_url
    else:
        from service.redis_conn import embedded_redis_url

        env["BACKFILL_REDIS_URL"] = embedded_redis_url(Settings(data_dir=data_dir))
    return env


@dataclass
class _Gallery:
    """The demo's images, their labels, external ids and PNG payloads."""

    images: np.ndarray
    labels: np.ndarray
    ids: list[str] = field(init=False)
    id_index: dict[str, int] = field(init=False)
    payloads: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.ids = [f"fmnist-test-{i}" for i in range(len(self.images))]
        self.id_index = {s: i for i, s in enumerate(self.ids)}
        self.payloads = [_b64(img) for img in self.images]

    def load(self, client: Client, progress: bool, labels: bool = True) -> None:
        """POST /items in chunks of 500 (v1 serving)."""
        bar = tqdm(total=len(self.images), desc="loading gallery", unit="img", disable=not progress)
        for i in range(0, len(self.images), 500):
            chunk = [
                {"id": self.ids[j], "image_b64": self.payloads[j]} | ({"label": int(self.labels[j])} if labels else {})
                for j in range(i, min(i + 500, len(self.images)))
            ]
            client.post("/items", {"items": chunk})
            bar.update(len(chunk))
        bar.close()


def _live(client: Client, gallery: _Gallery, k: int = 100) -> tuple[float, float]:
    """(mAP@k, top-1) of the whole gallery sent as queries through /search/batch, each item's own hit left out."""
    from models import evaluate

    ranked_ext, _ = client.search_all(gallery.payloads, k + 1)
    idx = gallery.id_index
    ranked = [[idx[x] for x in row if idx[x] != q][:k] for q, row in enumerate(ranked_ext)]
    return evaluate.ranked_metrics(ranked, gallery.labels, k)


def _measurer(
    client: Client, gallery: _Gallery, offline: Any, k: int = 100
) -> Callable[[float, np.ndarray, str | None], tuple[float, float, float, float]]:
    """measure(fraction in the database, items in NEW, the serving path or None once completed) ->
    (live mAP, live top-1, offline mAP, offline top-1)."""

    def measure(fraction_db: float, in_new: np.ndarray, path: str | None) -> tuple[float, float, float, float]:
        _wait_ingested(client, gallery.payloads[0], fraction_db, path)
        live_map, live_top1 = _live(client, gallery, k)
        off_map, off_top1 = offline.evaluator.point(in_new, path or "reverse")  # all in NEW: any path
        return live_map, live_top1, off_map, off_top1

    return measure


def _old_only_point(client: Client, gallery: _Gallery, artifacts_dir: Path, old: str, result: DemoResult) -> Point:
    """The fraction-0 point of a rollout in its training phase (served old-only): measured live, and offline
    as old/old from the old encoder alone (the pack the offline harness needs does not exist yet)."""
    from models import evaluate
    from models.artifacts import load_encoder

    t0 = time.monotonic()
    _wait_ingested(client, gallery.payloads[0], 0.0, "old-only")
    live_map, live_top1 = _live(client, gallery)
    v_old = load_encoder(Path(artifacts_dir) / old).embed(gallery.images)
    ev = evaluate.Evaluator(np.asarray(gallery.labels), v_old, {"raw": evaluate.Space(v_old, v_old)}, 100)
    off_map, off_top1 = ev.single("raw")
    total = len(gallery.images)
    return Point(0.0, 0, total, live_map, live_top1, off_map, off_top1, time.monotonic() - t0, "old-only")


def _train_then_pause(client: Client, rid: int, say: Callable[..., Any], timeout: float = 1800.0) -> dict[str, Any]:
    """Wait for the worker to train the pair's pack on the gallery, then pause the rollout."""
    deadline = time.monotonic() + timeout
    state = client.rollout(rid)
    while state["status"] == "training":
        if time.monotonic() > deadline:
            raise TimeoutError(f"training did not finish: {state['training']}")
        time.sleep(0.5)
        state = client.rollout(rid)
    if state["status"] not in ("planning", "running", "paused"):
        raise RuntimeError(f"rollout ended {state['status']} in training: {state.get('error')}")
    client.post(f"/rollouts/{rid}/pause")
    say(f"trained the compat pack on the gallery: {state['training']}")
    return client.rollout(rid)


def _scheduled(client: Client, rid: int, state: dict[str, Any], fraction: float, timeout: float = 30.0) -> str:
    """The path serving at this point: wait for an `auto` rollout's scheduled switch (the API's progress
    loop makes it within seconds), then return the rollout's path."""
    from models.paths import scheduled_path

    want = scheduled_path(state["path"]["predicted"], fraction)
    auto = state["path"]["requested"] == "auto" and state["path"]["guard"] is None
    deadline = time.monotonic() + timeout
    while auto and want is not None and state["mode"] != want and time.monotonic() < deadline:
        time.sleep(0.2)
        state = client.rollout(rid)
    return str(state["mode"])


def _measure_points(
    client: Client,
    rid: int,
    engine: Any,
    gallery: _Gallery,
    measure: Callable[[float, np.ndarray, str | None], tuple[float, float, float, float]],
    result: DemoResult,
    n_points: int,
    progress: bool,
) -> None:
    """Advance the backfill to each fraction i/(n_points-1), pause there and measure."""
    targets = [i / (n_points - 1) for i in range(n_points)]
    bar = tqdm(total=len(targets), desc="backfill + measure", unit="pt", disable=not progress)
    for target in targets:
        t0 = time.monotonic()
        state = _advance_to(client, rid, target, engine)
        if result.points and state["status"] != "completed" and state["done"] == result.points[-1].done:
            bar.update(1)  # already past this target (a training sample starts backfilled): no new point
            continue
        in_new = _backfilled_mask(engine, gallery.id_index, state["to"])
        fraction = state["done"] / max(state["total"], 1)
        path = None if state["status"] == "completed" else _scheduled(client, rid, state, fraction)
        lm, lt, om, ot = measure(fraction if state["status"] != "completed" else 1.0, in_new, path)
        point = Point(fraction, state["done"], state["total"], lm, lt, om, ot, time.monotonic() - t0, path or "-")
        result.points.append(point)
        bar.set_postfix(fraction=f"{fraction:.2f}", live=f"{lm:.4f}", offline=f"{om:.4f}")
        bar.update(1)
    bar.close()


def run_demo(
    settings: Settings,
    out: Path,
    n_items: int = 10_000,
    n_points: int = 21,
    mode: str = "auto",
    policy: str = "uncertainty",
    batch_size: int = 50,
    progress: bool = True,
    old: str = "v1",
    new: str = "v2",
    offset: int = 0,
    unlabelled: bool = False,
) -> DemoResult:
    """Run the whole demo; returns the measured curve (also written under `out`)."""
    from models import evaluate
    from models.data import load_fashion_mnist

    t_start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)

    images, labels = load_fashion_mnist(settings.fashion_mnist_dir, "test")
    gallery = _Gallery(images[offset : offset + n_items], labels[offset : offset + n_items])
    env = _stack_env(settings, data_dir, old)
    result = DemoResult(
        items=len(gallery.images),
        mode=mode,
        policy=policy,
        old_old=float("nan"),
        new_new=float("nan"),
        pair=f"{old}->{new}",
    )
    with ExitStack() as stack:
        s = Stack(env, _free_port(), out)
        stack.callback(s.stop)
        say = typer.echo if progress else (lambda *_a, **_k: None)
        say(f"starting the API on {s.url} (logs in {out})")
        s.start_api()
        client = Client(s.url, DEMO_TOKEN)
        client.wait_ready(procs=s.procs)
        gallery.load(client, progress, labels=not unlabelled)

        # Upgrade and pause before any worker runs, so the first point is fraction 0 exactly; the
        # worker then plans the rollout and waits for each resume. `auto` resolves to a path here. A pair
        # without a compat pack trains one on the gallery first: the worker runs that phase, then the
        # rollout pauses (the training sample stays backfilled, so the first point is past 0).
        rollout = client.post("/upgrade", {"to": new, "mode": mode, "policy": policy, "batch_size": batch_size})
        rid = int(rollout["id"])
        if rollout["status"] == "training":
            result.points.append(_old_only_point(client, gallery, settings.artifacts_dir, old, result))
            s.start_worker()
            rollout = _train_then_pause(client, rid, say)
            result.training = rollout["training"]
        else:
            client.post(f"/rollouts/{rid}/pause")
        result.mode, result.policy = rollout["mode"], rollout["policy"]
        result.path_reason, result.predicted = rollout["path"]["reason"] or "", rollout["path"]["predicted"]
        say(f"rollout {rid}: path {rollout['mode']}, order {rollout['policy']} ({rollout['path']['reason']})")
        offline = evaluate.offline_point_fn(
            gallery.images, gallery.labels, settings.artifacts_dir, old, new, mode=result.mode, k=100
        )
        result.old_old, result.new_new = offline.old_old, offline.new_new
        measure = _measurer(client, gallery, offline)

        engine = _db_engine(settings.database_url, data_dir)
        stack.callback(engine.dispose)
        if result.training is None:
            s.start_worker()
        _measure_points(client, rid, engine, gallery, measure, result, n_points, progress)
        result.guard = client.rollout(rid)["path"]["guard"]
    result.seconds = time.monotonic() - t_start
    write_outputs(result, out)
    return result


def _db_engine(env_url: str | None, data_dir: Path) -> Any:
    from service.db import make_engine

    return make_engine(Settings(database_url=env_url, data_dir=data_dir))


def _advance_to(client: Client, rid: int, target: float, engine: Any, poll: float = 0.02) -> dict[str, Any]:
    """Let the backfill run until `target` of the tasks are done, then pause it and wait for the batch
    in flight to commit. Target 1.0 lets the rollout complete."""
    import sqlalchemy as sa

    state = client.rollout(rid)
    if target >= 1.0:
        if state["status"] == "paused":
            client.post(f"/rollouts/{rid}/resume")
        while state["status"] not in {"completed", "failed", "aborted"}:
            time.sleep(0.2)
            state = client.rollout(rid)
        if state["status"] != "completed":
            raise RuntimeError(f"rollout ended {state['status']}: {state.get('error')}")
        return state
    while not state["total"]:  # the plan runs while paused; wait for its tasks
        if state["status"] in {"failed", "aborted"}:
            raise RuntimeError(f"rollout ended {state['status']}: {state.get('error')}")
        time.sleep(0.1)
        state = client.rollout(rid)
    if state["done"] >= target * state["total"]:
        return state
    client.post(f"/rollouts/{rid}/resume")
    while True:
        state = client.rollout(rid)
        if state["total"] and state["done"] >= target * state["total"]:
            break
        time.sleep(poll)
    client.post(f"/rollouts/{rid}/pause")
    # the batch in flight commits after the pause: wait until no task of this rollout is leased
    while True:
        with engine.connect() as c:
            leased = c.execute(
                sa.text("select count(*) from backfill_tasks where rollout_id = :r and state = 'leased'"),
                {"r": rid},
            ).scalar_one()
        if leased == 0:
            return client.rollout(rid)
        time.sleep(0.05)


def _backfilled_mask(engine: Any, id_index: dict[str, int], to_version: str) -> np.ndarray:
    """Which gallery items have a committed new-model embedding (read from the database, the truth)."""
    import sqlalchemy as sa

    mask = np.zeros(len(id_index), dtype=bool)
    with engine.connect() as c:
        rows = c.execute(
            sa.text(
                "select i.external_id from embeddings e join items i on i.id = e.item_id "
                "where e.model_version = :v and i.deleted_at is null"
            ),
            {"v": to_version},
        )
        for (ext,) in rows:
            if ext in id_index:
                mask[id_index[ext]] = True
    return mask


def demo(
    items: int = typer.Option(10_000, help="Gallery size (Fashion-MNIST test images)."),
    points: int = typer.Option(22, min=3, help="Measuring points at fractions i/(points-1), as the harness."),
    mode: str = typer.Option("auto", help="auto | reverse | forward | two-pass | old-only"),
    policy: str = typer.Option("uncertainty", help="uncertainty | random | fifo"),
    batch_size: int = typer.Option(50, min=1, help="Backfill batch size (pause granularity)."),
    out: Path = typer.Option(REPO_ROOT / "runs" / "demo", help="Output folder."),
    artifacts: Path | None = typer.Option(None, help="Artifacts folder of the pair (default: the shipped one)."),
    old: str = typer.Option("v1", help="The model serving at the start (under --artifacts)."),
    new: str = typer.Option("v2", help="The model to upgrade to (under --artifacts)."),
    offset: int = typer.Option(0, min=0, help="First test image of the gallery."),
    unlabelled: bool = typer.Option(
        False, help="Load the gallery without labels (the service trains label-free; the demo still scores)."
    ),
    train_sample: int | None = typer.Option(None, min=20, help="BACKFILL_TRAIN_SAMPLE for a pair without a pack."),
) -> None:
    """Run the live upgrade demo on embedded defaults and write runs/demo/curve.{json,png,md}."""
    from models.data import DatasetMissing

    settings = get_settings()
    if artifacts is not None:
        settings = settings.model_copy(update={"artifacts_dir": artifacts.resolve()})
    try:
        if train_sample is not None:
            settings = settings.model_copy(update={"train_sample": train_sample})
        result = run_demo(settings, out, items, points, mode, policy, batch_size, True, old, new, offset, unlabelled)
    except DatasetMissing as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from e
    typer.echo(table(result))
    typer.echo(f"wrote {out / 'curve.json'} and {out / 'curve.png'}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
