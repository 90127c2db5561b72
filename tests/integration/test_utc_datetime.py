"""`UTCDateTime`: every datetime column reads back timezone-aware UTC (SQLite included) and refuses naive input."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import StatementError

from service.config import Settings
from service.db import Item, make_engine, make_sessionmaker
from service.db.migrate import upgrade_head

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_aware_utc_in_and_out(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        settings = Settings(data_dir=tmp_path)
        upgrade_head(settings)
    else:
        settings = Settings(database_url=request.getfixturevalue("pg"), data_dir=tmp_path)
    engine = make_engine(settings)
    sm = make_sessionmaker(engine)
    plus2 = dt.timezone(dt.timedelta(hours=2))
    with sm() as s:
        s.add(Item(external_id="a", payload=b"x", deleted_at=dt.datetime(2030, 1, 1, 12, tzinfo=plus2)))
        s.commit()
    with sm() as s:
        row = s.scalars(sa.select(Item)).one()
        assert row.created_at.tzinfo == dt.UTC and row.updated_at.tzinfo == dt.UTC
        assert row.deleted_at == dt.datetime(2030, 1, 1, 10, tzinfo=dt.UTC) and row.deleted_at.tzinfo == dt.UTC
        cutoff = dt.datetime(2030, 1, 1, 11, tzinfo=plus2)  # 09:00 UTC: compared in UTC on every backend
        assert s.scalar(sa.select(sa.func.count()).where(Item.deleted_at > cutoff)) == 1
        with pytest.raises(StatementError, match="naive datetime"):
            s.execute(sa.update(Item).values(deleted_at=dt.datetime(2030, 1, 1)))
    engine.dispose()
