"""The live quality signal of a rollout and its guard.

- `plan_probe` (the plan job, worker): picks up to `probe_queries` labelled live items, seeded by the rollout
  id, and measures their old/old mAP@k the independent way: brute force over every live item's stored
  old-model vector, each probe item left out of its own list. That is the baseline the rollout must not
  fall below; it is stored in `rollouts.probe`.
- `Prober` (every API process, a daemon thread): every `probe_interval_seconds` during a rollout, sends the
  probe items' own images through the real query path (`Runtime.search`: the path's encoder passes, both
  sides, calibration, merge), drops each item's own hit, and scores mAP@k against the stored labels. It
  exports `backfill_probe_map`, records the figure on the rollout, and when a *running* rollout's figure is
  below the baseline by more than `guard_margin`, the guard pauses it and moves it to old-only
  (`service.paths.trip_guard`).

mAP@k here is the harness's definition (models/evaluate.ap_at_k): relevant = same label; unlabelled items
are never relevant. Galleries without labels get no probe (the rollout resource says so).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.evaluate import ap_at_k, search_subset
from models.preprocess import decode
from service import paths
from service.config import Settings
from service.db import queries
from service.db.models import Embedding, Item, Rollout, utcnow
from service.metrics import PREDICTED_MARGIN, PROBE_BASELINE_MAP, PROBE_MAP, PROBE_MARGIN

log = logging.getLogger(__name__)

NO_LABEL = np.iinfo(np.int64).min  # outside int32: never equal to a stored label


def _vectors(session: Session, model: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = session.execute(
        sa.select(Item.id, Item.label, Embedding.vector)
        .join(Embedding, Embedding.item_id == Item.id)
        .where(Embedding.model_version == model, Item.deleted_at.is_(None))
        .order_by(Item.id)
    ).all()
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    labels = np.array([NO_LABEL if r[1] is None else r[1] for r in rows], dtype=np.int64)
    vecs = np.stack([np.frombuffer(r[2], dtype="<f4") for r in rows]) if rows else np.zeros((0, 1), np.float32)
    return ids, labels, vecs


def plan_probe(session: Session, rollout: Rollout, settings: Settings) -> dict[str, Any]:
    """The rollout's probe: item ids and their old/old mAP@k (brute force over stored old vectors)."""
    k = settings.probe_k
    ids, labels, vecs = _vectors(session, rollout.from_version)
    labelled = np.nonzero(labels != NO_LABEL)[0]
    n = min(settings.probe_queries, len(labelled))
    if n == 0 or len(ids) < 2:
        why = "no labelled items" if settings.probe_queries else "BACKFILL_PROBE_QUERIES=0"
        return {"queries": 0, "k": k, "disabled": why}
    pick = np.sort(np.random.default_rng(rollout.id).choice(labelled, size=n, replace=False))
    _, hits = search_subset(vecs, ids, vecs[pick], k, query_ids=ids[pick])
    at = np.searchsorted(ids, np.maximum(hits, 0))  # ids ascend (ORDER BY Item.id)
    hit_labels = np.where(hits >= 0, labels[np.minimum(at, len(ids) - 1)], NO_LABEL)
    baseline = float(_ap(hit_labels, labels[pick]).mean())
    return {
        "items": [int(i) for i in ids[pick]],
        "queries": int(n),
        "k": k,
        "baseline_map": round(baseline, 5),
        "baseline_at": utcnow().isoformat(),
    }


def _ap(hit_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """Per-query AP@k from (Q, k) labels of the ranked hits (NO_LABEL = empty or unlabelled)."""
    q, k = hit_labels.shape
    ranked = np.where(hit_labels != NO_LABEL, np.arange(q * k).reshape(q, k), -1)
    flat = hit_labels.reshape(-1)
    return ap_at_k(ranked, flat, query_labels, k)[0]


def predicted_margin(predicted: dict[str, Any] | None, fraction: float) -> float | None:
    """The predicted curve (mAP at evenly spaced fractions) minus predicted old/old, at `fraction`."""
    if not predicted or not predicted.get("map"):
        return None
    values = np.asarray(predicted["map"], dtype=np.float64)
    return float(np.interp(fraction, np.linspace(0.0, 1.0, len(values)), values) - float(predicted["old_old"]))


class Prober:
    """Measures the active rollout's probe through `search` every `interval` seconds (a daemon thread)."""

    def __init__(
        self,
        sessionmaker: Callable[[], Session],
        settings: Settings,
        search: Callable[[list[np.ndarray], int], tuple[list[list[Any]], Any]],
        redis_client: Any = None,
    ) -> None:
        self.sm = sessionmaker
        self.settings = settings
        self.search = search
        self.redis = redis_client
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cache: tuple[int, list[str], list[np.ndarray], np.ndarray] | None = None  # rollout, ids, images, labels

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.probe_interval_seconds):
            try:
                self.once()
            except Exception as e:  # the probe is advisory: never take the API down
                log.warning("probe failed: %s", e)

    def _probe_set(self, session: Session, rollout: Rollout) -> tuple[list[str], list[np.ndarray], np.ndarray]:
        if self._cache is None or self._cache[0] != rollout.id:
            ids = (rollout.probe or {}).get("items") or []
            rows = session.execute(
                sa.select(Item.external_id, Item.payload, Item.label)
                .where(Item.id.in_(ids), Item.deleted_at.is_(None), Item.label.is_not(None))
                .order_by(Item.id)
            ).all()
            images = [decode(r.payload) for r in rows]
            self._cache = (rollout.id, [r.external_id for r in rows], images, np.array([r.label for r in rows]))
        return self._cache[1], self._cache[2], self._cache[3]

    def once(self) -> float | None:
        """One measurement of the active rollout (None when there is nothing to probe)."""
        with self.sm() as s:
            rollout = queries.active_rollout(s)
            probe = (rollout.probe if rollout is not None else None) or {}
            if rollout is None or not probe.get("items"):
                return None
            ext_ids, images, labels = self._probe_set(s, rollout)
            if not ext_ids:
                return None
            k = int(probe["k"])
            results, serving = self.search(images, k + 1)
            if serving.rollout_id != rollout.id:
                return None  # this process has not rebuilt for the rollout yet
            hit_ext = sorted({h.id for row in results for h in row})
            label_of = dict(
                s.execute(sa.select(Item.external_id, Item.label).where(Item.external_id.in_(hit_ext))).tuples().all()
            )
            hit_labels = np.full((len(results), k), NO_LABEL, dtype=np.int64)
            for q, (own, row) in enumerate(zip(ext_ids, results, strict=True)):
                ranked = [label_of.get(h.id) for h in row if h.id != own][:k]
                hit_labels[q, : len(ranked)] = [NO_LABEL if v is None else v for v in ranked]
            live = float(_ap(hit_labels, labels.astype(np.int64)).mean())
            baseline = float(probe["baseline_map"])
            self._record(s, rollout, live, serving.mode)
            series = (str(rollout.id), str(serving.mode))
            PROBE_MAP.labels(*series).set(live)
            PROBE_MARGIN.labels(*series).set(live - baseline)
            PROBE_BASELINE_MAP.labels(str(rollout.id)).set(baseline)
            predicted = predicted_margin(rollout.predicted, serving.backfilled_fraction)
            if predicted is not None:
                PREDICTED_MARGIN.labels(*series).set(predicted)
            if live < baseline - self.settings.guard_margin:
                paths.trip_guard(s, rollout.id, live, baseline, self.settings.guard_margin, self.redis)
            return live

    @staticmethod
    def _record(session: Session, rollout: Rollout, live: float, path: str | None) -> None:
        live_fields = {"live_map": round(live, 5), "live_path": path, "live_at": utcnow().isoformat()}
        probe = {**(rollout.probe or {}), **live_fields}
        session.execute(sa.update(Rollout).where(Rollout.id == rollout.id).values(probe=probe))
        session.commit()
