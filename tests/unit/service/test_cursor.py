"""The ingestion cursor's gap bookkeeping (service/cursor.py), checked against a plain set of seqs."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from service.cursor import Cursor


class FakeHorizon:
    """Transactions are numbered; `running` holds the ones still open."""

    settle_seconds = 1.0

    def __init__(self) -> None:
        self.next_xid = 1
        self.running: set[int] = set()

    def token(self, session: Any) -> int:
        return self.next_xid

    def floor(self, session: Any) -> float:
        return min(self.running, default=self.next_xid)


def test_gaps_open_close_and_split() -> None:
    c = Cursor()
    c.observe([1, 2, 5, 9], now=0.0)
    assert c.hw == 9 and [(g.lo, g.hi) for g in c.gaps] == [(3, 4), (6, 8)]
    assert c.unseen(3) and c.unseen(7) and c.unseen(10) and not c.unseen(5) and not c.unseen(2)
    c.observe([7], now=0.5)  # a late commit inside a gap splits it
    assert [(g.lo, g.hi) for g in c.gaps] == [(3, 4), (6, 6), (8, 8)] and len(c) == 4


def test_a_gap_outlives_any_transaction_that_could_fill_it() -> None:
    h = FakeHorizon()
    h.running = {1}  # a slow writer holding seq 2 (say)
    h.next_xid = 3
    c = Cursor()
    c.observe([1, 3], now=0.0)
    assert c.settle(None, h, now=0.5) == 0 and len(c) == 1  # too young for a token
    assert c.settle(None, h, now=2.0) == 0 and c.gaps[0].token == 3  # token taken, writer 1 still runs
    assert c.settle(None, h, now=500.0) == 0 and len(c) == 1  # no time limit
    h.running.clear()
    assert c.settle(None, h, now=501.0) == 1 and not c.gaps


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(1, 60), max_size=8), max_size=12))
def test_observe_matches_a_set_model(batches: list[list[int]]) -> None:
    """Whatever order seqs are seen in, unseen(s) is exactly 's was never observed'."""
    c = Cursor()
    seen: set[int] = set()
    for t, batch in enumerate(batches):
        c.observe(batch, now=float(t))
        seen |= set(batch)
        for s in range(1, 70):
            assert c.unseen(s) == (s not in seen), (s, seen, c.gaps)
        assert len(c) == (max(seen) - len(seen) if seen else 0)
        assert all(a.hi < b.lo for a, b in zip(c.gaps, c.gaps[1:], strict=False))
