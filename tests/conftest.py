"""Shared fixtures. Integration tests talk to real Postgres and Redis servers.

Defaults: postgresql+psycopg://postgres@127.0.0.1:5432/test and redis://127.0.0.1:6379, overridable by
BACKFILL_TEST_DATABASE_URL / BACKFILL_TEST_REDIS_URL. Each test session gets its own freshly migrated
Postgres database (created next to the given one and dropped at the end) and its own Redis database
(claimed among 1-15 with a lock key in database 0, so two sessions on one host never flush each other's;
a BACKFILL_TEST_REDIS_URL is used as given). Each test starts with empty tables and an empty Redis
database. When CI=true an unreachable server is an error, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from devtools.scratch_db import create_database, drop_database
from service.config import Settings
from service.db.models import Base

TEST_DB_URL = os.environ.get("BACKFILL_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TEST_REDIS_URL = os.environ.get("BACKFILL_TEST_REDIS_URL", "")
REDIS_SERVER = "redis://127.0.0.1:6379"
LOCK_SECONDS = 3 * 3600
IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(what: str, err: Exception) -> None:
    msg = f"{what} is not reachable ({err}); run `make test`, which starts it"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def _admin_url() -> sa.URL:
    url = make_url(TEST_DB_URL)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url


@pytest.fixture(scope="session")
def pg_server_url() -> sa.URL:
    url = _admin_url()
    try:
        eng = sa.create_engine(url)
        with eng.connect() as c:
            c.execute(sa.text("select 1"))
        eng.dispose()
    except Exception as e:
        _unavailable("PostgreSQL", e)
    return url


@pytest.fixture
def fresh_pg_url(pg_server_url: sa.URL) -> Iterator[str]:
    """An empty, unmigrated Postgres database for this test only."""
    url = create_database(pg_server_url, "backfill_fresh")
    yield url.render_as_string(hide_password=False)
    drop_database(pg_server_url, url)


@pytest.fixture(scope="session")
def pg_url(pg_server_url: sa.URL) -> Iterator[str]:
    """A Postgres database migrated to head, shared by the session's tests."""
    from service.db.migrate import upgrade_head

    url = create_database(pg_server_url)
    rendered = url.render_as_string(hide_password=False)
    upgrade_head(Settings(database_url=rendered))
    yield rendered
    drop_database(pg_server_url, url)


def truncate_all(url: str) -> None:
    """Empty every table. A session a failed test left open would make TRUNCATE wait for its locks until
    the test timeout: wait 5 s at most, then end the database's other connections and truncate."""
    eng = sa.create_engine(url)
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    try:
        for attempt in range(2):
            try:
                with eng.begin() as c:
                    c.execute(sa.text("SET LOCAL lock_timeout = '5s'"))
                    c.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
                return
            except sa.exc.OperationalError:
                if attempt:
                    raise
                with eng.begin() as c:
                    c.execute(
                        sa.text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
                    )
    finally:
        eng.dispose()


@pytest.fixture
def pg(pg_url: str) -> str:
    """The session's migrated Postgres database, emptied for this test."""
    truncate_all(pg_url)
    return pg_url


@pytest.fixture(scope="session")
def redis_session_url() -> Iterator[str]:
    """This session's own Redis database."""
    if TEST_REDIS_URL:
        yield TEST_REDIS_URL
        return
    try:
        admin = redis.Redis.from_url(f"{REDIS_SERVER}/0")
        admin.ping()
    except Exception as e:
        _unavailable("Redis", e)
    mine = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    db = claim_redis_db(admin, mine)
    if db is None:
        pytest.fail("all of Redis databases 1-15 are claimed by other test sessions", pytrace=False)
    try:
        yield f"{REDIS_SERVER}/{db}"
    finally:
        release_redis_db(admin, db, mine)
        admin.close()


def claim_redis_db(admin: redis.Redis, owner: str) -> int | None:
    """The first of databases 15..1 that no other session holds, locked for `owner` (None: all taken)."""
    for n in range(15, 0, -1):
        if admin.set(f"backfill-tests:db:{n}", owner, nx=True, ex=LOCK_SECONDS):
            return n
    return None


def release_redis_db(admin: redis.Redis, db: int, owner: str) -> None:
    if admin.get(f"backfill-tests:db:{db}") == owner.encode():
        admin.delete(f"backfill-tests:db:{db}")


@pytest.fixture
def redis_url(redis_session_url: str) -> str:
    """A real Redis database, flushed for this test."""
    try:
        r = redis.Redis.from_url(redis_session_url)
        r.ping()
        r.flushdb()
        r.close()
    except Exception as e:
        _unavailable("Redis", e)
    return redis_session_url


@pytest.fixture
def settings(pg: str, redis_url: str, tmp_path: Path) -> Settings:
    """Settings pointing at the real test Postgres and Redis."""
    return Settings(database_url=pg, redis_url=redis_url, data_dir=tmp_path / "data")
