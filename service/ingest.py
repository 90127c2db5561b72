"""Follow the embeddings table into the in-memory indices (docs/design.md, "Rollout lifecycle", step 4).

A `Follower` thread polls every `ingest_poll_seconds` and wakes early on any Redis event. Each cycle it
re-reads the layout (serving model + active rollout) in one statement; a changed layout means a full
rebuild into a fresh `IndexSet`, swapped in when caught up. Otherwise it reads the embedding rows past
its cursor and applies them in atomic batches (a target-model row moves its item from OLD to NEW).

Out-of-order commits, rolled-back inserts and deleted rows: `service/cursor.py`. Every read pages by
`seq`, so a cycle reads everything committed before it started and the process is ready only after a
complete pass.

Deletes: `items.deleted_seq` is `max(deleted_seq) + 1` at delete time; the cursor re-reads a window of
`DELETE_LOOKBACK` below its delete watermark each cycle so concurrent deletes cannot slip past.

The shared index (milvus backend, `SharedSpaces`): the follower holding the writer lease
(service/index_writer.py) applies rows to the shared collections; its "rebuild" is a reconciliation of the
collections with Postgres (at its start, on a layout change, every `reconcile_seconds`): the same full read
of the table, writing only what the collections lack or hold otherwise, then deleting what they hold and
Postgres does not put there, then stamping the layout on them (`backfill_index_reconcile_repairs_total`),
then retiring the collections of spaces no layout uses (dropped a reconciliation period later:
`SharedSpaces.retire_unused`, `backfill_index_collections_dropped_total`). Every other follower is a reader:
it reads ids only (never a vector) to know each side's members and the external ids, and swaps to a layout
only once the writer has stamped it on its collections.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from models.evaluate import RESCORE_DEPTH
from service import events
from service.cursor import Cursor, Horizon, horizon_for
from service.db.models import Embedding, Item, ModelVersion, Rollout
from service.index import IndexManager, IndexSet, Layout, VectorIndex
from service.index_backend import SpaceIndex, SpaceMaker
from service.index_writer import WriterLease
from service.metrics import (
    INDEX_COLLECTIONS_DROPPED,
    INDEX_RECONCILE_REPAIRS,
    INDEX_RECONCILED_TIMESTAMP,
    INDEX_VECTORS,
    INDEX_WRITER,
    INGESTED_TOTAL,
    INGESTION_LAG_SECONDS,
    SERVING_INFO,
)
from service.rescore import ItemVectors

log = logging.getLogger(__name__)

DELETE_LOOKBACK = 1_000


def read_layout(session: Session) -> Layout:
    """Serving model and active rollout, read in ONE statement so a completion committing in between
    cannot produce a mixed view."""
    row = session.execute(
        sa.select(ModelVersion.name, Rollout.id, Rollout.from_version, Rollout.to_version, Rollout.mode)
        .select_from(ModelVersion)
        .outerjoin(Rollout, Rollout.active_lock == 1)
        .where(ModelVersion.status == "serving")
        .limit(1)
    ).first()
    if row is None:
        return Layout(serving=None)
    serving, rid, src, dst, mode = row
    if rid is None:
        return Layout(serving=serving)
    return Layout(serving=serving, rollout_id=int(rid), from_model=src, to_model=dst, mode=mode)


def layout_key(layout: Layout) -> str:
    """The stamp a reconciled shared collection carries (service/milvus_index.py)."""
    return f"{layout.serving}|{layout.rollout_id}|{layout.from_model}|{layout.to_model}|{layout.mode}"


# A shared collection no layout uses is dropped one reconciliation period after the writer found it unused, and
# never sooner than this: readers follow a layout change within a poll, so none still searches it by then.
RETIRE_GRACE_MIN_SECONDS = 60.0


def spaces_of(layout: Layout) -> list[str]:
    return [str(sp) for sp in (layout.new_space, layout.old_space) if sp is not None]


class Follower:
    """Keeps `manager.current` in step with the database; one background thread plus a pub/sub thread."""

    def __init__(
        self,
        sm: sessionmaker[Session],
        manager: IndexManager,
        *,
        factory: str,
        use_gpu: bool,
        search_params: str = "",
        batch_size: int,
        poll_seconds: float,
        forward: Callable[[str, str, np.ndarray], np.ndarray],
        r: redis.Redis | None = None,
        on_cycle: Callable[[Session], None] | None = None,
        make_space: SpaceMaker | None = None,
        reconcile_seconds: float = 300.0,
    ) -> None:
        self.sm = sm
        self._serving_labels: list[tuple[str, str, str]] = []
        self.manager = manager
        self.factory = factory
        self.search_params = search_params
        self.use_gpu = use_gpu
        # Another index backend's maker (service/index_backend.py); None: FAISS `VectorIndex` from the above.
        self.make_space = make_space
        self._retired: IndexSet | None = None  # that backend's previous layout, released one swap later
        # The shared index (SharedSpaces): who writes it, and when the writer reconciles it next.
        shared = bool(getattr(make_space, "shared", False))
        self._lease = WriterLease(sm.kw["bind"], getattr(make_space, "prefix", "")) if shared else None
        self._writer: bool | None = None
        self.reconcile_seconds = reconcile_seconds
        self._next_reconcile = 0.0
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.forward = forward  # (from, to, old vectors) -> h(old vectors)
        self.on_cycle = on_cycle  # first thing of every cycle, in its session (the runtime re-reads artifacts)
        self.redis = r
        self.cursor = Cursor()
        self._horizon: Horizon | None = None
        self.ready = threading.Event()
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cycle = threading.Condition()
        self._started = 0
        self._done = 0
        self._threads: list[threading.Thread] = []
        self._pubsub: Any = None

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        t = threading.Thread(target=self._run, name="ingest-follower", daemon=True)
        t.start()
        self._threads.append(t)
        if self.redis is not None:
            p = threading.Thread(target=self._listen, name="ingest-events", daemon=True)
            p.start()
            self._threads.append(p)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        if self.make_space is not None:
            self._release(self._retired)
            self._release(self.manager.current)
            self._retired = None
            with contextlib.suppress(Exception):  # the engine's client (a milvus-lite server: stopped)
                getattr(self.make_space, "close", lambda: None)()
        if self._lease is not None:
            self._lease.release()

    def wake(self) -> None:
        self._wake.set()

    def sync_and_wait(self, timeout: float = 10.0) -> bool:
        """Wake the follower and wait for a whole cycle that started after this call (read-your-writes
        for this process). Returns False on timeout."""
        with self._cycle:
            target = self._started + 1
            self._wake.set()
            return self._cycle.wait_for(lambda: self._done >= target, timeout)

    def _run(self) -> None:
        backoff = self.poll_seconds
        while not self._stop.is_set():
            self._wake.clear()
            with self._cycle:
                self._started += 1
                me = self._started
            try:
                self.sync_once()
                self.last_error = None
                backoff = self.poll_seconds
            except Exception as e:  # DB down, a bad artifact: keep serving what we have, retry
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("ingestion cycle failed; retrying")
                backoff = min(max(backoff * 2, self.poll_seconds), 10.0)
            finally:
                with self._cycle:
                    self._done = me
                    self._cycle.notify_all()
            self._wake.wait(backoff if self.last_error else self.poll_seconds)

    def _listen(self) -> None:
        assert self.redis is not None
        while not self._stop.is_set():
            try:
                ps = self.redis.pubsub(ignore_subscribe_messages=True)
                self._pubsub = ps
                ps.subscribe(events.CHANNEL)
                while not self._stop.is_set():
                    if ps.get_message(timeout=0.2) is not None:
                        self._wake.set()
            except (redis.RedisError, OSError, ValueError) as e:
                if self._stop.is_set():
                    break
                log.warning("event subscription lost (%s); polling only until it reconnects", e)
                self._stop.wait(1.0)
            finally:
                with contextlib.suppress(Exception):
                    self._pubsub.close()

    # --- one cycle -----------------------------------------------------------------------------------
    def sync_once(self) -> None:
        with self.sm() as s:
            if self.on_cycle is not None:
                self.on_cycle(s)
            layout = read_layout(s)
        current = self.manager.current
        if self._lease is not None:
            if not self._sync_shared(current, layout):
                return  # a reader whose first layout the writer has not reconciled yet: not ready
        elif current is None or current.layout != layout:
            self.rebuild(layout)
        else:
            self._catch_up(current, self.cursor, metrics=True)
        self.ready.set()
        self._export_metrics()

    def _sync_shared(self, current: IndexSet | None, layout: Layout) -> bool:
        """One cycle on the shared index; False while this process has nothing truthful to serve."""
        assert self._lease is not None and self.make_space is not None
        writer = self._lease.held()
        changed = writer != self._writer
        self._writer = writer
        self.make_space.writes = writer  # type: ignore[attr-defined]
        INDEX_WRITER.set(1 if writer else 0)
        if writer:
            reason = None
            if current is None or changed:
                reason = "start"
            elif current.layout != layout:
                reason = "layout"
            elif time.monotonic() >= self._next_reconcile:
                reason = "periodic"
            if reason is None and current is not None:
                self._catch_up(current, self.cursor, metrics=True)
            else:
                self.rebuild(layout, reconcile=reason)
            return True
        if current is not None and changed:  # the lease was lost: never write again through these sides
            for side in (current.new, current.old):
                if side is not None:
                    side.writes = False  # type: ignore[attr-defined]
        if current is not None and current.layout == layout:
            self._catch_up(current, self.cursor, metrics=True)
            return True
        key = layout_key(layout)
        if all(self.make_space.stamped(sp) == key for sp in spaces_of(layout)):  # type: ignore[attr-defined]
            self.rebuild(layout)
            return True
        if current is not None:  # the writer has not reconciled the new layout yet: serve the previous one
            self._catch_up(current, self.cursor, metrics=True)
        return current is not None

    def rebuild(self, layout: Layout, reconcile: str | None = None) -> IndexSet:
        """Build a fresh IndexSet for `layout` from the embeddings table, then swap it in. `reconcile` (the
        shared index's writer: why) makes it a reconciliation of the shared collections instead."""
        t0 = time.monotonic()
        cursor = Cursor()
        with self.sm() as s:
            dims = dict(s.execute(sa.select(ModelVersion.name, ModelVersion.dim)).tuples().all())
            cursor.del_hw = int(s.scalar(sa.select(sa.func.coalesce(sa.func.max(Item.deleted_seq), 0))) or 0)
        new = old = None
        if layout.new_model is not None:
            new = self._new_space(dims[layout.new_model], str(layout.new_space))
        if layout.in_rollout:
            old_dim = dims[str(layout.to_model)] if layout.mode == "forward" else dims[str(layout.from_model)]
            old = self._new_space(old_dim, str(layout.old_space))
        ix = IndexSet(layout=layout, new=new, old=old)
        if layout.mode == "reverse" and RESCORE_DEPTH > 0:  # h(v1) per OLD item: see service/rescore.py
            ix.rescore_depth = RESCORE_DEPTH
            if self._lease is not None:  # no per-process vectors: h on the candidates' v1 at query time
                ix.rescore_h = partial(self.forward, str(layout.from_model), str(layout.to_model))
            else:
                ix.rescore_vectors = ItemVectors(dims[str(layout.to_model)])
        try:
            if reconcile is not None:
                for side in (new, old):
                    if side is not None:
                        side.begin_reconcile()  # type: ignore[attr-defined]
            self._catch_up(ix, cursor, metrics=False)
            if reconcile is not None:
                self._finish_reconcile(ix, reconcile)
        except BaseException:
            if self.make_space is not None:  # never swapped in: nobody else holds it
                self._release(ix)
            raise
        previous = self.manager.swap(ix)
        self.cursor = cursor
        if self.make_space is not None and self._lease is None:  # per-process collections: a query may still
            self._release(self._retired)  # hold `previous`, so drop the one before it (shared ones stay)
            self._retired = previous
        # Zero the previous labels rather than clearing them: with several uvicorn processes (multiprocess
        # mode) a cleared series would keep its last value in the other processes' files.
        for labels in self._serving_labels:
            SERVING_INFO.labels(*labels).set(0)
        self._serving_labels = []
        if layout.query_model is not None:
            labels = (layout.query_model, str(layout.rollout_id or "none"), layout.mode or "none")
            SERVING_INFO.labels(*labels).set(1)
            self._serving_labels.append(labels)
        log.info(
            "indices rebuilt for %s in %.2fs (new=%d old=%d; previous layout %s)",
            layout,
            time.monotonic() - t0,
            len(new or ()),
            len(old or ()),
            previous.layout if previous else None,
        )
        return ix

    def _finish_reconcile(self, ix: IndexSet, reason: str) -> None:
        """Deletes after every insert, then the layout's stamp; the repairs counted by side and action."""
        for name, side in (("new", ix.new), ("old", ix.old)):
            if side is None:
                continue
            repairs = side.finish_reconcile()  # type: ignore[attr-defined]
            for action, n in repairs.items():
                if n:
                    INDEX_RECONCILE_REPAIRS.labels(side=name, action=action, reason=reason).inc(n)
            if any(repairs.values()):
                log.warning("index reconciliation (%s) repaired %s side: %s", reason, name, repairs)
        for side in (ix.new, ix.old):
            if side is not None:
                side.stamp(layout_key(ix.layout))  # type: ignore[attr-defined]
        retire = getattr(self.make_space, "retire_unused", None)  # shared collections: drop the unused ones
        if retire is not None:
            grace = max(self.reconcile_seconds, RETIRE_GRACE_MIN_SECONDS)
            INDEX_COLLECTIONS_DROPPED.inc(len(retire(spaces_of(ix.layout), grace)))
        self._next_reconcile = time.monotonic() + self.reconcile_seconds
        INDEX_RECONCILED_TIMESTAMP.set(time.time())

    def _new_space(self, dim: int, space: str) -> SpaceIndex:
        if self.make_space is not None:
            return self.make_space(dim, space)
        return VectorIndex(dim, self.factory, space=space, use_gpu=self.use_gpu, search_params=self.search_params)

    @staticmethod
    def _release(ix: IndexSet | None) -> None:
        """Close a retired set's sides once no reader is inside it (a backend's collections, dropped)."""
        if ix is None:
            return
        with ix.lock.write():
            for side in (ix.new, ix.old):
                if side is not None:
                    side.close()

    def _catch_up(self, ix: IndexSet, cursor: Cursor, metrics: bool) -> None:
        """Everything committed before this call: the rows past the watermark, then the open gaps, each
        read in pages of `batch_size` by seq; then the deletes."""
        while self._ingest_batch(ix, cursor, cursor.after_watermark(), metrics)[0] >= self.batch_size:
            pass
        for in_gaps in cursor.in_gaps():
            after = 0
            while True:
                fetched, last = self._ingest_batch(ix, cursor, sa.and_(in_gaps, Embedding.seq > after), metrics)
                if fetched < self.batch_size:
                    break
                after = last
        self._apply_deletes(ix, cursor)
        with self.sm() as s:
            if self._horizon is None:
                self._horizon = horizon_for(s)
            cursor.settle(s, self._horizon)

    def _ingest_batch(self, ix: IndexSet, cursor: Cursor, where: Any, metrics: bool) -> tuple[int, int]:
        """Apply one page of rows matching `where`; returns (rows fetched, the last seq fetched)."""
        layout = ix.layout
        # A reader of the shared index keeps ids, never vectors: it does not even read them.
        reads = all(getattr(side, "writes", True) for side in (ix.new, ix.old) if side is not None)
        stmt = (
            sa.select(
                Embedding.seq,
                Embedding.item_id,
                Embedding.model_version,
                Embedding.vector if reads else sa.null().label("vector"),
                Embedding.created_at,
                Item.external_id,
                Item.deleted_at,
            )
            .join(Item, Item.id == Embedding.item_id)
            .where(where)
            .order_by(Embedding.seq)
            .limit(self.batch_size)
        )
        with self.sm() as s:
            fetched = s.execute(stmt).all()
        if not fetched:
            return 0, 0
        rows = [r for r in fetched if cursor.unseen(int(r.seq))]
        new_model = layout.new_model
        old_model = layout.from_model if layout.in_rollout else None
        new_ids: list[int] = []
        new_vecs: list[np.ndarray] = []
        old_ids: list[int] = []
        old_vecs: list[np.ndarray] = []
        newest = None
        for r in rows:
            if r.deleted_at is not None:
                continue
            if r.model_version == new_model and ix.new is not None:
                ids, vecs, dim = new_ids, new_vecs, ix.new.dim
            elif old_model is not None and r.model_version == old_model and ix.old is not None:
                ids, vecs = old_ids, old_vecs
                dim = ix.old.dim if layout.mode != "forward" else -1
            else:
                continue
            v = np.frombuffer(r.vector, dtype="<f4") if reads else np.zeros(0, np.float32)
            if reads and dim >= 0 and v.shape[0] != dim:
                log.error("embedding seq %s has %d values, expected %d; skipped", r.seq, v.shape[0], dim)
                continue
            self.manager.external_ids[int(r.item_id)] = r.external_id
            ids.append(int(r.item_id))
            vecs.append(v)
            newest = r.created_at if newest is None or r.created_at > newest else newest
        to_new = to_old = None
        old_rescore = None
        if new_ids and ix.new is not None:
            to_new = (np.asarray(new_ids, np.int64), _stack(new_vecs, ix.new.dim, reads))
        if old_ids and ix.old is not None:
            ov = _stack(old_vecs, ix.old.dim, reads)
            if layout.mode == "forward" and reads:
                ov = self.forward(str(layout.from_model), str(layout.to_model), ov)
            to_old = (np.asarray(old_ids, np.int64), ov)
            if ix.rescore_vectors is not None:
                old_rescore = self.forward(str(layout.from_model), str(layout.to_model), ov)
        n_new, n_old = ix.apply(to_new=to_new, to_old=to_old, old_rescore=old_rescore)
        cursor.observe([int(r.seq) for r in rows])
        self._export_ingested(metrics, n_new, n_old, newest)
        return len(fetched), int(fetched[-1].seq)

    @staticmethod
    def _export_ingested(metrics: bool, n_new: int, n_old: int, newest: dt.datetime | None) -> None:
        if metrics:
            if n_new:
                INGESTED_TOTAL.labels(side="new").inc(n_new)
            if n_old:
                INGESTED_TOTAL.labels(side="old").inc(n_old)
            if newest is not None:
                INGESTION_LAG_SECONDS.set(max(0.0, time.time() - newest.timestamp()))

    def _apply_deletes(self, ix: IndexSet, cursor: Cursor) -> None:
        with self.sm() as s:
            rows = s.execute(
                sa.select(Item.id, Item.deleted_seq).where(
                    Item.deleted_seq.is_not(None), Item.deleted_seq > cursor.del_hw - DELETE_LOOKBACK
                )
            ).all()
        if not rows:
            return
        gone = [int(i) for i, _ in rows]
        ix.apply(remove=gone)
        cursor.del_hw = max(cursor.del_hw, *(int(d or 0) for _, d in rows))

    def _export_metrics(self) -> None:
        ix = self.manager.current
        if ix is None:
            return
        sides = ix.sides()
        INDEX_VECTORS.labels(side="new").set(sides["new"])
        INDEX_VECTORS.labels(side="old").set(sides["old"])


def _stack(vecs: list[np.ndarray], dim: int, reads: bool) -> np.ndarray:
    """A batch's vectors; zeros of the side's width for a reader of the shared index (it writes none)."""
    return np.stack(vecs).astype(np.float32) if reads else np.zeros((len(vecs), dim), np.float32)
