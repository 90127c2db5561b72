"""Every Prometheus metric of the system, defined once. Bounded labels only: model version and stage,
never an item id. Works under several uvicorn worker processes when PROMETHEUS_MULTIPROC_DIR is set
(see `registry()`); gauges then use an explicit multiprocess mode."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# --- API: query path -------------------------------------------------------------------------------
SEARCH_STAGE_SECONDS = Histogram(
    "backfill_search_stage_seconds",
    "Search latency by stage (decode, encode, search, merge, total).",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
HTTP_REQUESTS_TOTAL = Counter(
    "backfill_http_requests_total", "HTTP requests by route template and status code.", ["route", "status"]
)
HTTP_REQUEST_SECONDS = Histogram(
    "backfill_http_request_seconds",
    "HTTP request latency by route template.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
INDEX_VECTORS = Gauge(
    "backfill_index_vectors", "Vectors per index side (old, new).", ["side"], multiprocess_mode="livemax"
)
INGESTION_LAG_SECONDS = Gauge(
    "backfill_ingestion_lag_seconds",
    "Age of the newest ingested embedding when it became searchable.",
    multiprocess_mode="livemax",
)
ENCODER_PASSES = Counter(
    "backfill_query_encoder_passes_total",
    "Encoder forward passes spent on queries, by path (two-pass spends two per query).",
    ["path"],
)
PROBE_MAP = Gauge(
    "backfill_probe_map",
    "Live quality of the active rollout: mAP@k of its probe queries through the real query path.",
    ["rollout_id", "path"],
    multiprocess_mode="livemin",
)
PROBE_BASELINE_MAP = Gauge(
    "backfill_probe_baseline_map",
    "The same probe queries' mAP@k with the old model alone (old/old), measured when the rollout was planned.",
    ["rollout_id"],
    multiprocess_mode="livemax",
)
PROBE_MARGIN = Gauge(
    "backfill_probe_margin",
    "Live probe mAP@k minus its old/old baseline (below 0: worse than the old model alone).",
    ["rollout_id", "path"],
    multiprocess_mode="livemin",
)
PREDICTED_MARGIN = Gauge(
    "backfill_predicted_margin",
    "The pack's predicted mAP minus predicted old/old for the serving path at this process's backfilled fraction.",
    ["rollout_id", "path"],
    multiprocess_mode="livemin",
)
INGESTED_TOTAL = Counter("backfill_ingested_embeddings_total", "Embeddings moved into an index.", ["side"])
INDEX_RECONCILE_REPAIRS = Counter(
    "backfill_index_reconcile_repairs_total",
    "Rows the shared index's writer changed when reconciling a collection with Postgres (milvus backend), by "
    "side (old, new), action (inserted, replaced, deleted) and reason (start: a writer took over, e.g. after a "
    "crash; layout: a rollout started, changed path or ended; periodic: drift found by the periodic check).",
    ["side", "action", "reason"],
)
INDEX_COLLECTIONS_DROPPED = Counter(
    "backfill_index_collections_dropped_total",
    "Shared collections the index's writer dropped because no layout had used their space for a whole "
    "reconciliation period (milvus backend; Postgres keeps their vectors).",
)
INDEX_RECONCILED_TIMESTAMP = Gauge(
    "backfill_index_reconciled_timestamp_seconds",
    "When the shared index's writer last finished reconciling it with Postgres (unix time; milvus backend).",
    multiprocess_mode="livemax",
)
INDEX_WRITER = Gauge(
    "backfill_index_writer",
    "1 in the process that writes the shared index (milvus backend), 0 in the processes that only search it.",
    multiprocess_mode="livesum",
)
SERVING_INFO = Gauge(
    "backfill_serving_info",
    "1 for the serving model and the rollout in progress (rollout_id='none' outside a rollout).",
    ["model", "rollout_id", "mode"],
    multiprocess_mode="livemax",
)
ROLLOUT_PROGRESS_RATIO = Gauge(
    "backfill_rollout_progress_ratio",
    "Fraction of the active rollout's tasks done.",
    multiprocess_mode="livemax",
)
ROLLOUT_PENDING = Gauge(
    "backfill_rollout_pending_items",
    "Tasks of the active rollout not yet done or failed.",
    multiprocess_mode="livemax",
)
ROLLOUT_TOTAL = Gauge("backfill_rollout_total_items", "Tasks of the active rollout.", multiprocess_mode="livemax")
ROLLOUT_DONE = Gauge("backfill_rollout_done_items", "Tasks done.", multiprocess_mode="livemax")
ROLLOUT_FAILED = Gauge("backfill_rollout_failed_items", "Tasks failed.", multiprocess_mode="livemax")
ROLLOUT_FAILED_BY_REASON = Gauge(
    "backfill_rollout_failed_items_by_reason",
    "Failed tasks of the active (else the newest) rollout per reason (invalid payload, lease expired, exception type).",
    ["reason"],
    multiprocess_mode="livemax",
)
ROLLOUT_ITEMS_PER_SECOND = Gauge(
    "backfill_rollout_items_per_second", "Backfill rate over the last minute.", multiprocess_mode="livemax"
)
ROLLOUT_ETA_SECONDS = Gauge(
    "backfill_rollout_eta_seconds", "Estimated seconds to completion (-1 unknown).", multiprocess_mode="livemax"
)

# --- Worker ------------------------------------------------------------------------------------------
WORKER_ITEMS_TOTAL = Counter("backfill_worker_items_total", "Items backfilled (embedding committed).", ["model"])
WORKER_FAILURES_TOTAL = Counter("backfill_worker_failures_total", "Item failures (an attempt that raised).", ["model"])
WORKER_BATCH_SECONDS = Histogram(
    "backfill_worker_batch_seconds",
    "Backfill batch duration (claim to commit).",
    ["model"],
    buckets=BATCH_BUCKETS,
)
WORKER_CLAIM_SECONDS = Histogram(
    "backfill_worker_claim_seconds", "Time to claim a batch of tasks.", buckets=LATENCY_BUCKETS
)


def registry() -> CollectorRegistry:
    """The registry to expose: a multiprocess collector when PROMETHEUS_MULTIPROC_DIR is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return reg
    from prometheus_client import REGISTRY

    return REGISTRY
