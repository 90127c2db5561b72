"""Which rows of the embeddings table a follower has not applied yet: a keyset watermark plus the holes below it.

`embeddings.seq` is allocated when a row is inserted, not when its transaction commits, so a follower can
see seq 7 before seq 5 commits. The cursor reads forward from its watermark (`seq > hw`, in pages, so a
scan can never stall on rows it has already seen) and remembers every seq it skipped as a closed range.
It asks for those ranges again each cycle until they are *settled*: no transaction that could still commit
a seq inside them is running. Then nothing can ever appear there and the range is dropped.

When a range is settled depends on the database, hence the `Horizon`:
- Postgres: a range opened at time t takes a token `xmax` of a snapshot taken at least `SETTLE_SECONDS`
  after t (by then whichever transaction allocated a seq of the range has its transaction id, a few
  microseconds after allocating), and is settled once the oldest running transaction is newer than that
  token (`txid_snapshot_xmin(txid_current_snapshot()) >= token`). A long transaction keeps its range open
  for as long as it runs, however long that is: holes cost memory per range, not per seq.
- SQLite: writers are serialised, so a seq below one already visible is never committed later: every
  range is settled once it has been asked for again.
Rolled-back inserts, deleted rows (retention sweeps, purges) and late commits are thus all handled
without a time limit, so no row is ever skipped and no scan stops early.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.db.models import Embedding

SETTLE_SECONDS = 1.0
RANGES_PER_QUERY = 500  # gap ranges asked for in one statement


class Horizon(Protocol):
    """When can no running transaction commit a seq inside a gap any more?"""

    settle_seconds: float  # how old a gap must be before it takes a token

    def token(self, session: Session) -> int:
        """A mark of the transactions started so far."""

    def floor(self, session: Session) -> float:
        """Every transaction whose mark is below this has ended."""


class PostgresHorizon:
    settle_seconds = SETTLE_SECONDS

    def token(self, session: Session) -> int:
        return int(session.scalar(sa.text("SELECT txid_snapshot_xmax(txid_current_snapshot())")))

    def floor(self, session: Session) -> float:
        return int(session.scalar(sa.text("SELECT txid_snapshot_xmin(txid_current_snapshot())")))


class SerialHorizon:
    """Serialised writers (SQLite): what a reader sees below the newest visible seq is final."""

    settle_seconds = 0.0

    def token(self, session: Session) -> int:
        return 0

    def floor(self, session: Session) -> float:
        return math.inf


def horizon_for(session: Session) -> Horizon:
    return PostgresHorizon() if session.get_bind().dialect.name == "postgresql" else SerialHorizon()


@dataclass
class Gap:
    """seqs lo..hi (inclusive) were skipped over and have not been seen since."""

    lo: int
    hi: int
    opened: float
    token: int | None = None  # taken `settle_seconds` after the gap opened


@dataclass
class Cursor:
    hw: int = 0  # the highest seq seen
    gaps: list[Gap] = field(default_factory=list)  # disjoint, sorted by lo
    del_hw: int = 0  # delete watermark over items.deleted_seq

    def __len__(self) -> int:
        return sum(g.hi - g.lo + 1 for g in self.gaps)

    def __contains__(self, seq: int) -> bool:
        """Is `seq` an open gap?"""
        i = bisect.bisect_right([g.lo for g in self.gaps], seq) - 1
        return i >= 0 and self.gaps[i].lo <= seq <= self.gaps[i].hi

    def unseen(self, seq: int) -> bool:
        return seq > self.hw or seq in self

    def observe(self, seqs: list[int], now: float | None = None) -> None:
        """Record rows as applied: move the watermark, open a gap for every seq jumped over, close seen gaps."""
        now = time.monotonic() if now is None else now
        for s in sorted(seqs):
            if s > self.hw:
                if s > self.hw + 1:
                    self.gaps.append(Gap(self.hw + 1, s - 1, now))
                self.hw = s
            else:
                self._fill(s)

    def _fill(self, seq: int) -> None:
        i = bisect.bisect_right([g.lo for g in self.gaps], seq) - 1
        if i < 0 or not self.gaps[i].lo <= seq <= self.gaps[i].hi:
            return
        g = self.gaps[i]
        halves = ((g.lo, seq - 1), (seq + 1, g.hi))
        pieces = [Gap(lo, hi, g.opened, g.token) for lo, hi in halves if lo <= hi]
        self.gaps[i : i + 1] = pieces

    def after_watermark(self) -> Any:
        return Embedding.seq > self.hw

    def in_gaps(self) -> list[Any]:
        """SQL filters for the open gaps, `RANGES_PER_QUERY` ranges each."""
        out = []
        for i in range(0, len(self.gaps), RANGES_PER_QUERY):
            chunk = self.gaps[i : i + RANGES_PER_QUERY]
            out.append(sa.or_(*(Embedding.seq.between(g.lo, g.hi) for g in chunk)))
        return out

    def settle(self, session: Session, horizon: Horizon, now: float | None = None) -> int:
        """Drop the gaps no running transaction can fill any more; returns how many seqs were dropped.
        Call it only after the gaps were asked for in this cycle."""
        now = time.monotonic() if now is None else now
        if not self.gaps:
            return 0
        needs_token = [g for g in self.gaps if g.token is None and now - g.opened >= horizon.settle_seconds]
        if needs_token:
            token = horizon.token(session)
            for g in needs_token:
                g.token = token
        floor = horizon.floor(session)
        keep = [g for g in self.gaps if g.token is None or g.token > floor]
        dropped = len(self) - sum(g.hi - g.lo + 1 for g in keep)
        self.gaps = keep
        return dropped
