"""The test harness itself: sessions on one host do not share a Redis database, and a session a failed
test left open cannot hang the next test's TRUNCATE."""

from __future__ import annotations

import threading
import time

import pytest
import redis
import sqlalchemy as sa

from tests.conftest import REDIS_SERVER, claim_redis_db, release_redis_db, truncate_all

pytestmark = pytest.mark.integration


def test_two_sessions_claim_different_redis_databases(redis_session_url: str) -> None:
    admin = redis.Redis.from_url(f"{REDIS_SERVER}/0")
    a = claim_redis_db(admin, "session-a")
    b = claim_redis_db(admin, "session-b")
    try:
        assert a is not None and b is not None and a != b
        assert redis_session_url not in (f"{REDIS_SERVER}/{a}", f"{REDIS_SERVER}/{b}")
    finally:
        release_redis_db(admin, a or 0, "session-a")
        release_redis_db(admin, b or 0, "session-b")
    assert claim_redis_db(admin, "session-c") == a  # released databases are reused
    release_redis_db(admin, a or 0, "session-c")
    admin.close()


def test_truncate_does_not_wait_for_a_session_left_open(pg_url: str) -> None:
    leftover = sa.create_engine(pg_url)
    conn = leftover.connect()
    conn.execute(sa.text("SELECT count(*) FROM items"))  # an open transaction: holds a lock TRUNCATE waits for
    done = threading.Event()
    t0 = time.monotonic()
    worker = threading.Thread(target=lambda: (truncate_all(pg_url), done.set()))
    worker.start()
    worker.join(60)
    assert done.is_set() and time.monotonic() - t0 < 30
    with pytest.raises(sa.exc.OperationalError):  # the stuck connection was ended
        conn.execute(sa.text("SELECT 1"))
    conn.invalidate()
    leftover.dispose()
