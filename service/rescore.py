"""Re-scoring the reverse path's OLD candidates in the new model's space (docs/design.md, "Query paths").

On the reverse path the query is one pass of the new model, v2(q); OLD holds v1 vectors searched with
psi(v2(q)). psi's distances are a poor match for NEW's (the merge becomes "NEW first", issue 16), so the
top `depth * k` OLD candidates are re-ranked by ||v2(q) - h(v1)||^2, the forward path's distance, with h(v1)
kept per item beside the OLD index (computed once when the item enters OLD, never on the query path). The
query still costs one encoder pass; the extra work is a gather of `depth * k` rows and their distances.

`ItemVectors` is that per-item store: item id -> one vector, add (replace) / remove / take. The shared
Milvus index keeps no per-process vectors: its search returns the candidates' v1 vectors and h runs on them
per query (`rescore_vectors`; service/index.py `IndexSet.rescore_h`).
"""

from __future__ import annotations

import numpy as np

# Dead rows are compacted away once they are this share of the store.
COMPACT_FRACTION = 0.5


class ItemVectors:
    """Vectors keyed by item id (non-negative ints). Not thread-safe: `IndexSet` locks it."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._row = np.full(0, -1, dtype=np.int64)  # item id -> row in _vecs (-1 = absent)
        self._vecs = np.zeros((0, dim), dtype=np.float32)
        self._ids = np.zeros(0, dtype=np.int64)  # row -> item id (-1 = dead)
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def nbytes(self) -> int:
        """Bytes held: the vectors (dead rows until compaction included), row -> id, and id -> row."""
        return int(self._vecs.nbytes + self._ids.nbytes + self._row.nbytes)

    def _grow_map(self, top: int) -> None:
        if top >= len(self._row):
            grown = np.full(max(top + 1, 2 * len(self._row), 1024), -1, dtype=np.int64)
            grown[: len(self._row)] = self._row
            self._row = grown

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Store `vecs` under `ids` (an id already held is replaced; a repeated id keeps its last vector)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vecs = np.ascontiguousarray(vecs, dtype=np.float32).reshape(len(ids), self.dim)
        if not ids.size:
            return
        self.remove(ids)
        _, last = np.unique(ids[::-1], return_index=True)
        keep = np.sort(ids.size - 1 - last)
        ids, vecs = ids[keep], vecs[keep]
        self._grow_map(int(ids.max()))
        start = len(self._ids)
        self._vecs = np.concatenate([self._vecs, vecs])
        self._ids = np.concatenate([self._ids, ids])
        self._row[ids] = np.arange(start, start + len(ids))
        self._live += len(ids)

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < len(self._row))]
        rows = self._row[ids]
        rows = np.unique(rows[rows >= 0])
        if not rows.size:
            return
        self._ids[rows] = -1
        self._row[ids] = -1
        self._live -= len(rows)
        if len(self._ids) - self._live > COMPACT_FRACTION * max(len(self._ids), 1):
            self._compact()

    def _compact(self) -> None:
        keep = self._ids >= 0
        self._vecs = np.ascontiguousarray(self._vecs[keep])
        self._ids = self._ids[keep]
        self._row[:] = -1
        self._row[self._ids] = np.arange(len(self._ids))

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, held) for an array of ids of any shape; rows of ids not held (or -1) are zeros."""
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(self._row))
        rows = np.where(inside, self._row[np.where(inside, ids, 0)], -1)
        held = rows >= 0
        vecs = self._vecs[np.maximum(rows, 0)] if len(self._vecs) else np.zeros((*ids.shape, self.dim), np.float32)
        return np.where(held[..., None], vecs, 0.0).astype(np.float32), held


def rescore(queries: np.ndarray, cand_ids: np.ndarray, store: ItemVectors, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, d) query vectors and (M, c) candidate ids (-1 = empty) -> the k candidates nearest each query by
    squared L2 to their stored vectors: (M, k) distances (inf where empty) and ids (-1 there), ascending.
    A candidate the store does not hold is dropped (it cannot be ranked in this space)."""
    vecs, held = store.take(cand_ids)
    return rescore_vectors(queries, cand_ids, vecs, held, k)


def rescore_vectors(
    queries: np.ndarray, cand_ids: np.ndarray, vecs: np.ndarray, held: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """`rescore` with the candidates' vectors given ((M, c, d), `held` False where there is none): the shared
    index's reverse path computes h on the v1 vectors its search returned instead of keeping h(v1) per item."""
    q = np.asarray(queries, dtype=np.float32)
    diff = vecs - q[:, None, :]
    d = np.einsum("mcd,mcd->mc", diff, diff)
    d = np.where(held & (cand_ids >= 0), d, np.inf).astype(np.float32)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    d = np.take_along_axis(d, order, 1)
    ids = np.where(np.isfinite(d), np.take_along_axis(np.asarray(cand_ids, np.int64), order, 1), -1)
    if d.shape[1] < k:
        pad = k - d.shape[1]
        d = np.pad(d, ((0, 0), (0, pad)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return d, ids
