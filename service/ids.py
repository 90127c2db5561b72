"""Item ids in the API's memory: array coercion, a bitmap set of ids and the item id -> external id map
(`service/index.py` and the other index backends use them)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    """Item ids as a contiguous 1-d int64 array."""
    return np.ascontiguousarray(
        np.fromiter(ids, dtype=np.int64) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64
    ).reshape(-1)


def as_vecs(vecs: np.ndarray, dim: int) -> np.ndarray:
    """Vectors as a contiguous (N, dim) float32 array; ValueError on another shape."""
    v = np.ascontiguousarray(vecs, dtype=np.float32)
    if v.ndim != 2 or v.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (N, {dim}), got {tuple(v.shape)}")
    return v


class IdSet:
    """A set of non-negative item ids as a growable bitmap: 1 byte per id up to the largest one, instead of
    a Python set's ~60 bytes per member (item ids are dense database keys)."""

    def __init__(self) -> None:
        self._bits = np.zeros(1024, dtype=bool)
        self._n = 0

    def _grow(self, top: int) -> None:
        if top >= self._bits.size:
            bigger = np.zeros(max(top + 1, 2 * self._bits.size), dtype=bool)
            bigger[: self._bits.size] = self._bits
            self._bits = bigger

    def mask(self, ids: np.ndarray) -> np.ndarray:
        """Membership of each id of an int64 array."""
        inside = (ids >= 0) & (ids < self._bits.size)
        out = np.zeros(ids.shape, dtype=bool)
        out[inside] = self._bits[ids[inside]]
        return out

    def add(self, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        if ids.min() < 0:
            raise ValueError("item ids must be non-negative")
        self._grow(int(ids.max()))
        fresh = np.unique(ids[~self._bits[ids]])
        self._bits[fresh] = True
        self._n += int(fresh.size)

    def discard(self, ids: np.ndarray) -> np.ndarray:
        """Remove ids; returns those that were present (each once)."""
        present = np.unique(ids[self.mask(ids)])
        self._bits[present] = False
        self._n -= int(present.size)
        return present

    def __contains__(self, item_id: object) -> bool:
        return (
            isinstance(item_id, int | np.integer)
            and 0 <= int(item_id) < self._bits.size
            and bool(self._bits[int(item_id)])
        )

    def __len__(self) -> int:
        return self._n

    def to_set(self) -> set[int]:
        return {int(i) for i in np.flatnonzero(self._bits)}


class ExternalIds:
    """item id -> external id, immutable once assigned, packed into one byte buffer with offsets: about
    12 bytes per item plus the id's UTF-8 bytes, instead of a dict entry and a str object (~110 bytes)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._start = np.full(1024, -1, dtype=np.int64)
        self._len = np.zeros(1024, dtype=np.int32)
        self._n = 0

    def __setitem__(self, item_id: int, external_id: str) -> None:
        if item_id < 0:
            raise ValueError("item ids must be non-negative")
        if item_id >= self._start.size:
            size = max(item_id + 1, 2 * self._start.size)
            start = np.full(size, -1, dtype=np.int64)
            start[: self._start.size] = self._start
            length = np.zeros(size, dtype=np.int32)
            length[: self._len.size] = self._len
            self._start, self._len = start, length
        if self._start[item_id] >= 0:
            return  # immutable once assigned
        raw = external_id.encode()
        self._start[item_id] = len(self._buf)
        self._len[item_id] = len(raw)
        self._buf += raw
        self._n += 1

    def __contains__(self, item_id: object) -> bool:
        return (
            isinstance(item_id, int | np.integer)
            and 0 <= int(item_id) < self._start.size
            and bool(self._start[int(item_id)] >= 0)
        )

    def __getitem__(self, item_id: int) -> str:
        if item_id not in self:
            raise KeyError(item_id)
        a = int(self._start[item_id])
        return self._buf[a : a + int(self._len[item_id])].decode()

    def get(self, item_id: int, default: str | None = None) -> str | None:
        return self[item_id] if item_id in self else default  # noqa: SIM401 (this IS get)

    def __len__(self) -> int:
        return self._n
