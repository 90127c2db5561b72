"""The process's typed state (engine, sessionmaker, redis, encoders, compat packs, indices, follower) and
the query path over it. No HTTP here: `service.api` turns it into endpoints.

Start-up (`Runtime.start`): on SQLite migrate to head; register the artifacts directory; start the
ingestion follower, whose first cycle builds the indices from the embeddings table (`/readyz` answers 503
until it has). The follower re-reads the layout (serving model + active rollout) on every poll and on
every Redis event, so a rollout's start, completion or abort reaches every API process without a call.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from models.artifacts import CompatPack, Encoder, pick_device
from models.preprocess import Images
from service import errors
from service.config import Settings
from service.db import make_engine, make_sessionmaker, queries
from service.db.models import ModelVersion
from service.ids import ExternalIds
from service.index import IndexManager, IndexSet, Layout
from service.index_backend import space_maker
from service.ingest import Follower
from service.merge import Hit, merge_topk
from service.metrics import ENCODER_PASSES, SEARCH_STAGE_SECONDS
from service.model_cache import EncoderRef, ModelCache, PackRef, Pair
from service.probe import Prober
from service.redis_conn import make_redis

log = logging.getLogger(__name__)


class NotReady(errors.NotReady):
    """The indices are not built yet, or no model is serving (the field at fault is the service itself)."""

    def __init__(self, problem: str) -> None:
        super().__init__("service", problem)


@contextmanager
def stage(name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        SEARCH_STAGE_SECONDS.labels(stage=name).observe(time.perf_counter() - t0)


@dataclass(frozen=True)
class SearchHit:
    id: str
    distance: float
    source: str


@dataclass(frozen=True)
class Serving:
    model: str | None
    rollout_id: int | None
    backfilled_fraction: float
    mode: str | None


def serving_of(ix: IndexSet) -> Serving:
    lay = ix.layout
    return Serving(lay.query_model, lay.rollout_id, round(ix.backfilled_fraction(), 9), lay.mode)


@dataclass
class Runtime:
    """Everything a request handler needs, built once per process by the app's lifespan."""

    settings: Settings
    engine: Engine
    sessionmaker: sessionmaker[Session]
    redis: redis.Redis
    manager: IndexManager
    device: str
    follower: Follower | None = None
    prober: Prober | None = None
    models: ModelCache = field(init=False)
    # What each registered name / pair stands for now; re-read every follower cycle (`refresh_models`), so a
    # re-registered compat pack is loaded by its new checksum without a DB read on the query path.
    _encoder_refs: dict[str, EncoderRef] = field(default_factory=dict)
    _pack_refs: dict[Pair, PackRef] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    progress_seconds: float = 5.0

    def __post_init__(self) -> None:
        self.models = ModelCache(self.settings.artifacts_dir, lambda: self.device)

    # --- lifecycle -----------------------------------------------------------------------------------
    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        engine = make_engine(settings)
        return cls(
            settings=settings,
            engine=engine,
            sessionmaker=make_sessionmaker(engine),
            redis=make_redis(settings),
            manager=IndexManager(),
            device=pick_device(settings.use_gpu),
        )

    def start(self, *, register: bool = True, follow: bool = True) -> None:
        from service.registry import register_artifacts

        if self.settings.is_sqlite:
            from service.db.migrate import upgrade_head

            upgrade_head(self.settings)
        if register:
            with self.sessionmaker() as s:
                res = register_artifacts(s, self.settings.artifacts_dir, self.settings.default_model)
            log.info("artifacts: added %s, serving %s", res.added, res.serving)
        self.preload_encoders()
        self.follower = Follower(
            self.sessionmaker,
            self.manager,
            factory=self.settings.index_factory,
            search_params=self.settings.index_search_params,
            use_gpu=self.settings.use_gpu,
            batch_size=self.settings.rebuild_batch_size,
            poll_seconds=self.settings.ingest_poll_seconds,
            forward=self.forward,
            r=self.redis,
            on_cycle=self.refresh_models,
            make_space=space_maker(self.settings),
            reconcile_seconds=self.settings.milvus_reconcile_seconds,
        )
        if follow:
            self.follower.start()
            threading.Thread(target=self._progress_loop, name="rollout-progress", daemon=True).start()
            self.prober = Prober(self.sessionmaker, self.settings, self.search, self.redis)
            self.prober.start()

    def _progress_loop(self) -> None:
        """Keep the rollout gauges current even when no client polls /rollouts (dashboards read them), and
        move an `auto` rollout along its predicted path schedule."""
        from service.paths import follow_schedule
        from service.rollouts import refresh_progress_metrics

        while not self._stop.wait(self.progress_seconds):
            try:
                with self.sessionmaker() as s:
                    view = refresh_progress_metrics(s)
                    if view is not None:  # a scheduled path switch (two-pass early, one pass later)
                        follow_schedule(s, view.rollout, view.fraction, self.redis)
            except Exception as e:  # the database may be down for a while; try again next time
                log.debug("rollout progress refresh failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self.prober is not None:
            self.prober.stop()
        if self.follower is not None:
            self.follower.stop()
        with contextlib.suppress(Exception):
            self.redis.close()
        self.engine.dispose()

    @property
    def ready(self) -> bool:
        return self.follower is not None and self.follower.ready.is_set() and self.manager.current is not None

    def wait_ready(self, timeout: float = 30.0) -> bool:
        return self.follower is not None and self.follower.ready.wait(timeout)

    # --- models --------------------------------------------------------------------------------------
    def refresh_models(self, session: Session) -> None:
        """Re-read which artifact every model name and compat pair stands for (the follower calls it at the
        start of every cycle); the cache loads an artifact whose checksum changed on its next use."""
        self._encoder_refs = {m.name: EncoderRef.of(m) for m in queries.model_versions(session)}
        self._pack_refs = {(p.from_version, p.to_version): PackRef.of(p) for p in queries.compat_packs(session)}

    def preload_encoders(self) -> None:
        """Load every non-retired registered encoder once (the query path never loads a file)."""
        with self.sessionmaker() as s:
            self.refresh_models(s)
            names = queries.loadable_model_names(s)
        for name in names:
            try:
                self.encoder(name)
            except Exception as e:
                log.error("cannot load model %s: %s", name, e)

    def encoder(self, name: str) -> Encoder:
        ref = self._encoder_refs.get(name)
        if ref is None:
            with self.sessionmaker() as s:
                row = s.get(ModelVersion, name)
                if row is None:
                    raise NotReady(f"model {name!r} is not registered")
                ref = self._encoder_refs[name] = EncoderRef.of(row)
        return self.models.encoder(ref)

    def compat(self, src: str, dst: str) -> CompatPack:
        ref = self._pack_refs.get((src, dst))
        if ref is None:
            with self.sessionmaker() as s:
                row = queries.compat_pack(s, src, dst)
                if row is None:
                    raise NotReady(f"no compat pack {src} -> {dst} is registered")
                ref = self._pack_refs[(src, dst)] = PackRef.of(row)
        return self.models.compat(ref)

    def forward(self, src: str, dst: str, old_vecs: np.ndarray) -> np.ndarray:
        return self.compat(src, dst).forward(old_vecs)

    # --- query path ----------------------------------------------------------------------------------
    def current(self) -> IndexSet:
        ix = self.manager.current
        if ix is None or not self.ready:
            raise NotReady("indices are still loading")
        if ix.layout.query_model is None:
            raise NotReady("no model is serving; register artifacts (`backfill models register DIR`)")
        return ix

    def encode_queries(self, layout: Layout, images: Images) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The query vectors for NEW and OLD: one encoder pass on every path but two-pass (one per model);
        psi (a small MLP) only for a reverse-mode OLD side."""
        new_model, old_model = layout.new_model, layout.old_query_model
        q_new = self.encoder(str(new_model)).embed(images) if new_model is not None else None
        ENCODER_PASSES.labels(path=layout.mode or "none").inc(layout.encoder_passes * len(images))
        if not layout.in_rollout:
            return q_new, None
        q_old = q_new if old_model == new_model else self.encoder(str(old_model)).embed(images)
        if layout.mode == "reverse" and q_new is not None:
            q_old = self.compat(str(layout.from_model), str(layout.to_model)).reverse(q_new)
        return q_new, q_old

    def search(self, images: Images, k: int) -> tuple[list[list[SearchHit]], Serving]:
        """Query images (decoded, any size; each model fits them to its input) -> per query the k nearest
        live items, and serving info."""
        ix = self.current()  # one reference: encoding and search agree on the layout even across a swap
        lay = ix.layout
        with stage("encode"):
            q_new, q_old = self.encode_queries(lay, images)
        return self.search_vectors(ix, q_new, q_old, k)

    def search_vectors(
        self, ix: IndexSet, q_new: np.ndarray | None, q_old: np.ndarray | None, k: int
    ) -> tuple[list[list[SearchHit]], Serving]:
        lay = ix.layout
        with stage("search"):
            (nd, ni), old = ix.search(q_new, q_old, k)
        with stage("merge"):
            od = oi = None
            if old is not None:
                od, oi = old
                if lay.new_model is not None:  # on the old-only path nothing is merged: OLD is the answer
                    pack = self.compat(str(lay.from_model), str(lay.to_model))
                    # re-scored reverse hits carry forward-path distances (service/rescore.py)
                    calibration = "forward" if ix.rescores else str(lay.mode)
                    od = pack.calibrate(calibration, od)  # empty slots (id -1) are dropped by the merge
            merged = merge_topk(nd, ni, od, oi, k)
            ext = self.manager.external_ids
            results = [[_hit(h, ext) for h in row if h.item_id in ext] for row in merged]
        return results, serving_of(ix)


def _hit(h: Hit, ext: ExternalIds) -> SearchHit:
    return SearchHit(ext[h.item_id], h.distance, h.source)
