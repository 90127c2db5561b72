"""Who writes the shared index (the milvus backend, service/milvus_index.SharedSpaces): exactly one process.

`WriterLease` is a Postgres session-level advisory lock held on a connection of its own: the follower that
holds it applies the embeddings table to the shared collections, every other process only searches them.
One lock per shared index (keyed by its collections' prefix). The lock goes with its connection, so a
writer that dies (SIGKILL included) frees it at once and the next follower to ask takes over, reconciling
the collections with Postgres before it writes anything else. On SQLite (the embedded single-process mode)
the one process is the writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

log = logging.getLogger(__name__)


def lock_key(name: str) -> int:
    """pg_try_advisory_lock's 64-bit key for one shared index (its collections' prefix): two indices with
    different prefixes have a writer each."""
    return int.from_bytes(hashlib.sha1(f"backfill-index-writer:{name}".encode()).digest()[:8], "big", signed=True)


class WriterLease:
    """Held, or not, by this process; `held()` tries to take it when free and checks it is still held."""

    def __init__(self, engine: Engine, name: str = "backfill") -> None:
        self.engine = engine
        self.key = lock_key(name)
        self.serial = engine.dialect.name != "postgresql"  # SQLite: one process, always the writer
        self._conn: Connection | None = None

    def held(self) -> bool:
        if self.serial:
            return True
        if self._conn is not None:
            try:
                self._conn.execute(sa.text("SELECT 1"))
                self._conn.commit()  # never left idle in a transaction
                return True
            except Exception as e:  # the connection (and with it the lock) is gone
                log.warning("index writer lease lost (%s)", e)
                self.release()
        conn = self.engine.connect()
        try:
            got = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
            conn.commit()  # the lock is session-level: it outlives the transaction
        except Exception:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._conn = conn
        log.info("this process is now the index writer")
        return True

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                self._conn.commit()
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
