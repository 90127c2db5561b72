"""Scratch Postgres databases: created next to a given server's databases under a unique name, and dropped.

Used by the test suite's fixtures (tests/conftest.py), the benchmarks and the chaos run.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import sqlalchemy as sa


def create_database(server_url: sa.URL, prefix: str = "backfill_test") -> sa.URL:
    """Create an empty, uniquely named database on the test server and return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    eng = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return server_url.set(database=name)


def drop_database(server_url: sa.URL, url: sa.URL) -> None:
    eng = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    eng.dispose()


def server_url(url: str) -> sa.URL:
    """`url` as a SQLAlchemy URL with the psycopg (3) driver."""
    server = sa.engine.make_url(url)
    if server.drivername == "postgresql":
        server = server.set(drivername="postgresql+psycopg")
    return server


@contextlib.contextmanager
def migrated_database(server: sa.URL, prefix: str) -> Iterator[str]:
    """A fresh database on `server`, migrated to head (its rendered URL), dropped afterwards."""
    from service.config import Settings
    from service.db.migrate import upgrade_head

    url = create_database(server, prefix)
    try:
        rendered = url.render_as_string(hide_password=False)
        upgrade_head(Settings(database_url=rendered, log_level="WARNING"))
        yield rendered
    finally:
        drop_database(server, url)
