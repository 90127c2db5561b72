"""service.batching.SearchBatcher: ordering, per-request k, error isolation, the bounded wait, and results
identical to one unbatched search per request (checked against an independent brute-force computation)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from service.batching import SearchBatcher

GALLERY = np.random.default_rng(3).normal(size=(200, 8)).astype(np.float32)


class FakeRuntime:
    """`search(queries, k)` -> per query the k nearest gallery rows (id, distance), numpy brute force; records
    every call. A query vector holding NaN makes the whole call raise, as a bad image would."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[int, int]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def search(self, queries: list[np.ndarray], k: int) -> tuple[list[list[tuple[int, float]]], str]:
        with self.lock:
            self.calls.append((len(queries), k))
        if self.delay:
            time.sleep(self.delay)
        q = np.stack(queries)
        if np.isnan(q).any():
            raise ValueError("bad query")
        d = ((q[:, None, :] - GALLERY[None, :, :]) ** 2).sum(-1)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        return [[(int(i), float(d[r, i])) for i in row] for r, row in enumerate(order)], f"call{len(self.calls)}"


def expected(q: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Independent of the batcher and of FakeRuntime: a plain loop over the gallery."""
    dists = [(float(((GALLERY[i] - q) ** 2).sum()), i) for i in range(len(GALLERY))]
    return [(i, d) for d, i in sorted(dists)[:k]]


def queries(n: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32))


def same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    return [i for i, _ in got] == [i for i, _ in want] and np.allclose([d for _, d in got], [d for _, d in want])


async def gather(b: SearchBatcher[Any, Any], items: list[Any], ks: list[int]) -> list[Any]:
    return await asyncio.gather(*(b.search(x, k) for x, k in zip(items, ks, strict=True)), return_exceptions=True)


def test_concurrent_requests_share_one_call_and_each_gets_its_own_results_in_order() -> None:
    rt = FakeRuntime()
    qs = queries(20)
    ks = [1 + (i * 7) % 13 for i in range(20)]  # different k per request

    async def main() -> list[Any]:
        b = SearchBatcher(rt.search, max_batch=32, max_wait_s=0.05)
        return await gather(b, qs, ks)

    out = asyncio.run(main())
    assert rt.calls == [(20, max(ks))]  # one call, the largest k
    for q, k, (hits, serving) in zip(qs, ks, out, strict=True):
        assert len(hits) == k
        assert same(hits, expected(q, k))
        assert serving == "call1"  # every request reports the call that served it


def test_results_equal_unbatched_search() -> None:
    rt, solo = FakeRuntime(), FakeRuntime()
    qs = queries(40, seed=5)
    ks = [3, 10, 1, 25] * 10

    async def main() -> list[Any]:
        b = SearchBatcher(rt.search, max_batch=16, max_wait_s=0.01)
        return await gather(b, qs, ks)

    out = asyncio.run(main())
    for q, k, (hits, _) in zip(qs, ks, out, strict=True):
        alone, _ = solo.search([q], k)
        assert hits == alone[0]
    assert sum(n for n, _ in rt.calls) == 40 and all(n <= 16 for n, _ in rt.calls)


def test_max_batch_splits_and_keeps_order() -> None:
    rt = FakeRuntime()
    qs = queries(10)

    async def main() -> list[Any]:
        b = SearchBatcher(rt.search, max_batch=4, max_wait_s=0.05)
        return await gather(b, qs, [5] * 10)

    out = asyncio.run(main())
    assert [n for n, _ in rt.calls] == [4, 4, 2]
    for q, (hits, _) in zip(qs, out, strict=True):
        assert same(hits, expected(q, 5))


def test_a_bad_request_fails_alone() -> None:
    rt = FakeRuntime()
    qs = queries(6)
    qs[2] = np.full(8, np.nan, np.float32)  # the batched call raises; each is then searched alone

    async def main() -> list[Any]:
        b = SearchBatcher(rt.search, max_batch=32, max_wait_s=0.05)
        return await gather(b, qs, [4] * 6)

    out = asyncio.run(main())
    assert isinstance(out[2], ValueError)
    for i in (0, 1, 3, 4, 5):
        assert same(out[i][0], expected(qs[i], 4))
    assert rt.calls[0] == (6, 4) and len(rt.calls) == 1 + 6


def test_a_payload_prepare_rejects_fails_alone_without_a_retry() -> None:
    rt = FakeRuntime()

    def prepare(p: Any) -> np.ndarray:
        if p == "bad":
            raise KeyError("undecodable")
        return np.asarray(p, np.float32)

    qs = queries(3)
    payloads: list[Any] = [qs[0].tolist(), "bad", qs[2].tolist()]

    async def main() -> list[Any]:
        b = SearchBatcher(rt.search, max_batch=32, max_wait_s=0.05, prepare=prepare)
        return await gather(b, payloads, [2, 2, 2])

    out = asyncio.run(main())
    assert isinstance(out[1], KeyError)
    assert same(out[0][0], expected(qs[0], 2)) and same(out[2][0], expected(qs[2], 2))
    assert rt.calls == [(2, 2)]


def test_the_wait_is_bounded() -> None:
    """A batch that never fills runs when its oldest request has waited max_wait_s (not later)."""
    rt = FakeRuntime()
    wait = 0.05

    async def main() -> tuple[float, float]:
        b = SearchBatcher(rt.search, max_batch=1000, max_wait_s=wait)
        b._last = 2  # as after a batch of several: the next batch waits for company
        t0 = time.monotonic()
        await gather(b, queries(3), [1, 1, 1])
        both = time.monotonic() - t0
        t0 = time.monotonic()
        await b.search(queries(1)[0], 1)  # after a batch of 3 one lone request waits at most `wait`
        return both, time.monotonic() - t0

    both, alone = asyncio.run(main())
    assert wait * 0.8 <= both < wait + 0.5
    assert alone < wait + 0.5
    assert rt.calls == [(3, 1), (1, 1)]


def test_a_lone_client_does_not_wait() -> None:
    rt = FakeRuntime()

    async def main() -> list[float]:
        b = SearchBatcher(rt.search, max_batch=32, max_wait_s=1.0)
        took = []
        for q in queries(3):
            t0 = time.monotonic()
            await b.search(q, 3)
            took.append(time.monotonic() - t0)
        return took

    took = asyncio.run(main())
    assert took[1] < 0.5 and took[2] < 0.5  # the first batch was of one: no waiting after it
    assert rt.calls == [(1, 3)] * 3


def test_a_full_batch_runs_without_waiting() -> None:
    rt = FakeRuntime()

    async def main() -> float:
        b = SearchBatcher(rt.search, max_batch=5, max_wait_s=10.0)
        b._last = 5
        t0 = time.monotonic()
        await gather(b, queries(5), [2] * 5)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 5.0
    assert rt.calls == [(5, 2)]


def test_requests_arriving_during_a_batch_join_the_next() -> None:
    rt = FakeRuntime(delay=0.1)
    qs = queries(6)

    async def main() -> list[Any]:
        b = SearchBatcher(rt.search, max_batch=32, max_wait_s=0.0)
        first = asyncio.ensure_future(b.search(qs[0], 3))
        await asyncio.sleep(0.03)  # the first batch (of one) is running now
        rest = await gather(b, qs[1:], [3] * 5)
        return [await first, *rest]

    out = asyncio.run(main())
    assert rt.calls == [(1, 3), (5, 3)]
    for q, (hits, _) in zip(qs, out, strict=True):
        assert same(hits, expected(q, 3))


def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    rt = FakeRuntime(delay=0.05)
    qs = queries(3)

    async def main() -> list[Any]:
        b = SearchBatcher(rt.search, max_batch=32, max_wait_s=0.0)
        busy = asyncio.ensure_future(b.search(qs[0], 2))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(b.search(qs[1], 2))
        kept = asyncio.ensure_future(b.search(qs[2], 2))
        await asyncio.sleep(0)
        gone.cancel()
        return [await busy, await kept]

    out = asyncio.run(main())
    assert same(out[0][0], expected(qs[0], 2)) and same(out[1][0], expected(qs[2], 2))
    assert rt.calls == [(1, 2), (1, 2)]  # the cancelled request was not searched


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SearchBatcher(FakeRuntime().search, max_batch=0)
    with pytest.raises(ValueError):
        SearchBatcher(FakeRuntime().search, max_wait_s=-1)

    async def main() -> None:
        await SearchBatcher(FakeRuntime().search).search(queries(1)[0], 0)

    with pytest.raises(ValueError):
        asyncio.run(main())
