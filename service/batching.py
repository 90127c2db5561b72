"""Micro-batching of concurrent single searches: requests that arrive together share one search call (one
encoder pass, one FAISS search per index).

A request joins the open batch; the batch is run when it holds `max_batch` requests or when its oldest
request has waited `max_wait_s`, whichever comes first; after a batch of one (a lone client: nobody else
to wait for) the next one starts at once, without waiting. One batch runs at a time (in a worker thread, off the
event loop): requests that arrive while it runs queue for the next one, so under load batches fill by
themselves and a request waits at most `max_wait_s` plus the batch ahead of it. With `max_wait_s = 0` nothing
waits on purpose: a batch is whatever queued while the previous one ran.

Per request: its own `k` (the batch searches the largest k and each request gets its first k hits), its own
errors (a payload that fails `prepare` fails alone; when the batched search raises, every request of the
batch is searched again alone, so one bad query cannot fail the others) and exactly its own results.

The module is framework-free (no HTTP): `search(items, k)` is `Runtime.search`, `prepare(payload)` turns a
request's payload into a search item (the API decodes the image there, in the worker thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

H = TypeVar("H")  # one hit
S = TypeVar("S")  # what one search call says about itself (serving info), shared by its requests

Result = tuple[list[H], S]


@dataclass(eq=False)
class _Request:
    payload: Any
    k: int
    future: asyncio.Future[Any]
    arrived: float


class SearchBatcher(Generic[H, S]):
    """Batches `await batcher.search(payload, k)` calls made on one event loop into `search(items, max k)`."""

    def __init__(
        self,
        search: Callable[[list[Any], int], tuple[list[list[H]], S]],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        prepare: Callable[[Any], Any] | None = None,
    ) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self._search, self._prepare = search, prepare
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._pending: list[_Request] = []
        self._full = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._last = 0  # the size of the batch run last: a lone client (batches of 1) never waits
        self.batches = 0  # search calls made for batches (retries alone not counted)
        self.requests = 0  # requests those calls served
        self.largest = 0  # the largest batch so far

    async def search(self, payload: Any, k: int) -> Result[H, S]:
        """The k hits for one payload (and the serving info of the call that found them)."""
        if k < 1:
            raise ValueError("k must be >= 1")
        loop = asyncio.get_running_loop()
        req = _Request(payload, k, loop.create_future(), time.monotonic())
        self._pending.append(req)
        if len(self._pending) >= self.max_batch:
            self._full.set()
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        result: Result[H, S] = await req.future
        return result

    async def _drain(self) -> None:
        """Run batches while requests are pending; exits (and is started again by the next request) when idle."""
        try:
            while self._pending:
                left = self._pending[0].arrived + self.max_wait_s - time.monotonic()
                if len(self._pending) < self.max_batch and left > 0 and self._last > 1:
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), left)
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                self._last = len(batch)
                await self._run(batch)
        finally:
            self._drainer = None

    async def _run(self, batch: list[_Request]) -> None:
        live = [r for r in batch if not r.future.done()]  # a caller that went away (cancelled) costs nothing
        if not live:
            return
        try:
            outcomes = await asyncio.to_thread(self.compute, [(r.payload, r.k) for r in live])
        except BaseException as e:  # the loop is shutting down: nobody may wait forever
            for r in live:
                if r.future.done():
                    continue
                if isinstance(e, asyncio.CancelledError):
                    r.future.cancel()
                else:
                    r.future.set_exception(e)
            raise
        for r, outcome in zip(live, outcomes, strict=True):
            if r.future.done():
                continue
            if isinstance(outcome, BaseException):
                r.future.set_exception(outcome)
            else:
                r.future.set_result(outcome)

    def compute(self, requests: list[tuple[Any, int]]) -> list[Result[H, S] | BaseException]:
        """Blocking: per (payload, k), its result or its own exception, in order. One search call for all the
        payloads that `prepare` accepts; if that call raises, each of them is searched alone."""
        out: list[Result[H, S] | BaseException | None] = [None] * len(requests)
        items: list[Any] = []
        where: list[int] = []
        for i, (payload, _) in enumerate(requests):
            try:
                items.append(self._prepare(payload) if self._prepare is not None else payload)
                where.append(i)
            except Exception as e:
                out[i] = e
        ks = [requests[i][1] for i in where]
        if where:
            try:
                rows, serving = self._search(items, max(ks))
                for j, i in enumerate(where):
                    out[i] = (list(rows[j][: ks[j]]), serving)
                self.batches += 1
                self.requests += len(where)
                self.largest = max(self.largest, len(where))
            except Exception as e:
                if len(where) == 1:
                    out[where[0]] = e
                else:
                    for j, i in enumerate(where):
                        out[i] = self._alone(items[j], ks[j])
        return [o if o is not None else RuntimeError("no result") for o in out]

    def _alone(self, item: Any, k: int) -> Result[H, S] | BaseException:
        try:
            rows, serving = self._search([item], k)
            return list(rows[0]), serving
        except Exception as e:
            return e
