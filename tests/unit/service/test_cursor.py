"""The ingestion cursor's gap tracking (out-of-order commits)."""

from __future__ import annotations

from service.ingest import Cursor


def test_gaps_are_remembered_until_seen_or_expired() -> None:
    c = Cursor(grace_seconds=10)
    c.observe([1, 2, 5], now=0.0)
    assert c.hw == 5 and set(c.gaps) == {3, 4}
    assert c.unseen(3) and not c.unseen(2) and c.unseen(6)
    c.observe([4], now=1.0)  # a lower seq committed late
    assert set(c.gaps) == {3}
    assert c.expire(now=5.0) == 0 and set(c.gaps) == {3}
    assert c.expire(now=11.0) == 1 and not c.gaps  # a rolled-back insert never shows up


def test_where_asks_for_open_gaps() -> None:
    c = Cursor()
    c.observe([1, 3])
    sql = str(c.where().compile(compile_kwargs={"literal_binds": True}))
    assert "seq > 3" in sql and "IN (2)" in sql
