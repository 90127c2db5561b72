"""Cases that the mutation run of service/cursor.py showed untested (docs/reliability.md, "Mutation testing"):
the clock when no `now` is given, the settle boundary, a split gap keeping its age and token, tokens
taken once, the session handed to the horizon, and the SQL filters built from the gaps."""

from __future__ import annotations

import math
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.cursor import RANGES_PER_QUERY, Cursor, PostgresHorizon, SerialHorizon, horizon_for
from tests.unit.service.test_cursor import FakeHorizon


class SessionCheckingHorizon(FakeHorizon):
    """A FakeHorizon that insists on being asked through the session the cursor was given."""

    def __init__(self, session: object) -> None:
        super().__init__()
        self.session = session

    def token(self, session: Any) -> int:
        assert session is self.session
        return super().token(session)

    def floor(self, session: Any) -> float:
        assert session is self.session
        return super().floor(session)


def test_an_empty_cursor_settles_nothing() -> None:
    assert Cursor().settle(None, FakeHorizon(), now=10.0) == 0


def test_without_now_the_monotonic_clock_is_used() -> None:
    h = FakeHorizon()
    h.running, h.next_xid = {1}, 2  # a writer that could still fill the gap: it stays
    c = Cursor()
    c.observe([1, 3])  # opened now, by the monotonic clock
    opened = c.gaps[0].opened
    assert abs(opened - time.monotonic()) < 5
    c.settle(None, h)  # younger than settle_seconds: no token yet
    assert c.gaps[0].token is None
    # A `now` given is used as given, even far from the clock.
    far = Cursor()
    far.observe([1, 3], now=time.monotonic() + 1000)
    far.settle(None, h, now=far.gaps[0].opened + 0.5)
    assert far.gaps[0].token is None
    far.settle(None, h, now=far.gaps[0].opened + 2)
    assert far.gaps[0].token == h.next_xid


def test_a_gap_takes_its_token_at_exactly_settle_seconds_and_not_before() -> None:
    h = FakeHorizon()
    c = Cursor()
    c.observe([1, 3], now=10.0)
    h.running, h.next_xid = {1}, 2
    c.settle(None, h, now=10.5)
    assert c.gaps[0].token is None
    c.settle(None, h, now=10.0 + h.settle_seconds)
    assert c.gaps[0].token == 2


def test_a_token_is_taken_once_and_kept_by_both_halves_of_a_split_gap() -> None:
    """Writer 1 may still fill the gap 2..8; the token taken while it ran is 2. Later transactions (5 still
    open, next 10) cannot fill it: once 1 ends the gap goes, even though 5 runs on. A split gap keeps its
    token; re-taking one (10) would keep the gap until 5 ends too."""
    h = FakeHorizon()
    h.running, h.next_xid = {1}, 2
    c = Cursor()
    c.observe([1, 9], now=0.0)
    assert c.settle(None, h, now=2.0) == 0 and c.gaps[0].token == 2
    c.observe([5], now=3.0)  # a late commit splits the gap
    assert [(g.lo, g.hi, g.opened, g.token) for g in c.gaps] == [(2, 4, 0.0, 2), (6, 8, 0.0, 2)]
    h.running, h.next_xid = {5}, 10
    assert c.settle(None, h, now=4.0) == 6 and not c.gaps


def test_a_gap_split_before_its_token_keeps_its_age() -> None:
    h = FakeHorizon()
    h.running, h.next_xid = {1}, 2
    c = Cursor()
    c.observe([1, 9], now=0.0)
    c.observe([5], now=0.5)
    assert [(g.opened, g.token) for g in c.gaps] == [(0.0, None), (0.0, None)]
    c.settle(None, h, now=1.0)  # 1 s after the gap opened (not after the split)
    assert [g.token for g in c.gaps] == [2, 2]


def test_the_horizon_is_asked_through_the_given_session() -> None:
    session = object()
    h = SessionCheckingHorizon(session)
    c = Cursor()
    c.observe([1, 3], now=0.0)
    c.settle(session, h, now=5.0)  # type: ignore[arg-type]
    assert c.gaps == []


def test_sql_filters_cover_exactly_the_gaps() -> None:
    c = Cursor()
    c.observe([1, 4], now=0.0)
    assert str(c.after_watermark().compile(compile_kwargs={"literal_binds": True})) == "embeddings.seq > 4"
    (only,) = c.in_gaps()
    assert str(only.compile(compile_kwargs={"literal_binds": True})) == "embeddings.seq BETWEEN 2 AND 3"
    many = Cursor()
    many.observe(list(range(1, 2 * (RANGES_PER_QUERY + 10), 2)), now=0.0)  # RANGES_PER_QUERY + 9 one-seq gaps
    chunks = [str(f.compile(compile_kwargs={"literal_binds": True})) for f in many.in_gaps()]
    assert len(chunks) == 2
    assert chunks[0].count("BETWEEN") == RANGES_PER_QUERY and chunks[1].count("BETWEEN") == 9
    assert chunks[0].startswith("embeddings.seq BETWEEN 2 AND 2 OR ") and chunks[1].endswith("BETWEEN 1018 AND 1018")
    assert Cursor().in_gaps() == []


def test_the_horizon_follows_the_database() -> None:
    sqlite = Session(bind=sa.create_engine("sqlite://"))
    postgres = Session(bind=sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none"))  # never connects
    assert isinstance(horizon_for(sqlite), SerialHorizon)
    assert isinstance(horizon_for(postgres), PostgresHorizon)
    serial = SerialHorizon()
    assert serial.settle_seconds == 0.0 and serial.token(sqlite) == 0 and serial.floor(sqlite) == math.inf
