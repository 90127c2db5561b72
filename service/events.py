"""Redis pub/sub nudges between processes. They only shorten lags: every consumer also polls the
database, so a lost message (or a flushed Redis) loses nothing."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

CHANNEL = "backfill:events"
EMBEDDINGS = "embeddings"  # new rows in the embeddings table (or item deletes): API processes ingest
ROLLOUT = "rollout"  # a rollout changed status (planned, paused, completed, aborted...): reload state

log = logging.getLogger(__name__)


def publish(r: redis.Redis, kind: str, **fields: Any) -> None:
    """Best effort: a failed publish is logged, never raised (the database is the truth)."""
    try:
        r.publish(CHANNEL, json.dumps({"type": kind, **fields}))
    except redis.RedisError as e:
        log.warning("event publish failed (%s); consumers will catch up by polling", e)
