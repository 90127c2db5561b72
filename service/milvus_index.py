"""One embedding space in a Milvus collection: the ``milvus`` index backend (service/index_backend.py).

A collection per space: the item id is its INT64 primary key, one FLOAT_VECTOR field, a FLAT index with the
L2 metric (Milvus's L2 is the squared distance, FAISS's convention, so the merge and its calibration need no
refit), Session consistency (a search sees every write this process's client made before it; Strong would
also wait for other writers, about 30 ms a search on milvus-lite), and the space stamped in the collection's
properties. `MilvusIndex` is the same interface as `service.index.VectorIndex`: add (upsert,
replace on a known id), remove, search with -1 / +inf padding, and membership from an id bitmap kept
beside it (an `IdSet`, 1 byte per id: `IndexSet.apply` asks membership per id, a round trip each would not
do). Milvus orders nothing between two collections; `IndexSet.apply` inserts into NEW before it deletes
from OLD, so a moving item is never absent from both (the merge drops the duplicate meanwhile).

This slice rebuilds the collections from Postgres on a layout change like the FAISS indices (each process
owns its collections, named with its pid and a counter, and drops them when they are retired); sharing one
set of collections between processes, with no rebuild, is the next step (issue 19).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from service.ids import IdSet, as_ids, as_vecs

ID, VEC = "id", "vec"
MAX_TOPK = 16_384  # Milvus's limit on a search's `limit`
WRITE_CHUNK = 10_000  # rows per insert/upsert call (keeps each gRPC message well under Milvus's 64 MiB)
# Rows written (upserted or deleted) after which the collection is flushed: Milvus searches unflushed (growing)
# rows without their index, and on milvus-lite that cost grows fast (20k unflushed 64-d rows: about 470 ms a
# query, against about 30 ms once flushed); a flush costs about 0.1-0.2 s, under the write lock.
FLUSH_ROWS = 2048


def connect(uri: str) -> Any:
    """A `MilvusClient`; a path that is not a URL is a milvus-lite file, started in this process."""
    from pymilvus import MilvusClient

    if "://" in uri:
        return MilvusClient(uri)
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri)
    except Exception as e:  # pymilvus's ConnectionConfigException: "Open local milvus failed"
        raise RuntimeError(
            f"milvus-lite could not open {uri} ({e}); a milvus-lite file serves one process: with several API "
            "processes, set BACKFILL_MILVUS_URI to a Milvus server"
        ) from e


class MilvusIndex:
    """One embedding space's collection; ids are item ids. Not thread-safe: `IndexSet` locks it."""

    def __init__(self, client: Any, dim: int, *, space: str, collection: str) -> None:
        from pymilvus import DataType, MilvusClient

        self.client = client
        self.dim = dim
        self.space = space
        self.collection = collection
        self._ids = IdSet()
        self._unflushed = 0
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID, DataType.INT64, is_primary=True)
        schema.add_field(VEC, DataType.FLOAT_VECTOR, dim=dim)
        params = client.prepare_index_params()
        params.add_index(field_name=VEC, index_type="FLAT", metric_type="L2")
        if client.has_collection(collection):  # a leftover of a crashed process with this pid
            client.drop_collection(collection)
        client.create_collection(
            collection, schema=schema, index_params=params, consistency_level="Session", properties={"space": space}
        )

    # --- size and membership -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._ids

    def ids(self) -> set[int]:
        return self._ids.to_set()

    # --- writes --------------------------------------------------------------------------------------
    def add(self, ids: Iterable[int] | np.ndarray, vecs: np.ndarray) -> None:
        """Upsert vectors under item ids; an id already present is replaced, a repeated id keeps its last."""
        ids_a = as_ids(ids)
        v = as_vecs(vecs, self.dim)
        if ids_a.shape[0] != v.shape[0]:
            raise ValueError("ids and vectors differ in length")
        if ids_a.size == 0:
            return
        if np.unique(ids_a).size != ids_a.size:
            _, last = np.unique(ids_a[::-1], return_index=True)
            keep = np.sort(ids_a.size - 1 - last)
            ids_a, v = ids_a[keep], v[keep]
        if ids_a.min() < 0:
            raise ValueError("item ids must be non-negative")
        for a in range(0, ids_a.size, WRITE_CHUNK):
            chunk_ids, chunk_vecs = ids_a[a : a + WRITE_CHUNK], v[a : a + WRITE_CHUNK]
            rows = [{ID: int(i), VEC: vec} for i, vec in zip(chunk_ids, chunk_vecs, strict=True)]
            self.client.upsert(self.collection, rows)
        self._ids.add(ids_a)
        self._wrote(ids_a.size)

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Delete item ids (absent ones are ignored); returns how many were present."""
        gone = self._ids.discard(as_ids(ids))
        if gone.size:
            self.client.delete(self.collection, ids=gone.tolist())
            self._wrote(gone.size)
        return int(gone.size)

    def _wrote(self, rows: int) -> None:
        self._unflushed += rows
        if self._unflushed >= FLUSH_ROWS:
            self.client.flush(self.collection)
            self._unflushed = 0

    # --- reads ---------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(M, dim) queries -> (M, k) squared-L2 distances and item ids, -1 / +inf where fewer exist."""
        q = as_vecs(queries, self.dim)
        m = q.shape[0]
        out_d = np.full((m, k), np.inf, dtype=np.float32)
        out_i = np.full((m, k), -1, dtype=np.int64)
        limit = min(k, len(self._ids), MAX_TOPK)
        if m == 0 or limit <= 0:
            return out_d, out_i
        hits = self.client.search(
            self.collection,
            data=list(q),
            limit=limit,
            anns_field=VEC,
            search_params={"metric_type": "L2"},
            output_fields=[ID],
        )
        for row, found in enumerate(hits):
            n = len(found)
            out_i[row, :n] = [h[ID] for h in found]
            out_d[row, :n] = [h["distance"] for h in found]
        return out_d, out_i

    def close(self) -> None:
        """Drop the collection (a retired layout's space)."""
        self.client.drop_collection(self.collection)


class MilvusSpaces:
    """Makes this process's collections on one Milvus (a `SpaceMaker`): ``backfill_<space>_<pid>_<n>``."""

    def __init__(self, uri: str, prefix: str = "backfill") -> None:
        self.uri = uri
        self.prefix = prefix
        self.client = connect(uri)
        self._serial = itertools.count()

    def __call__(self, dim: int, space: str) -> MilvusIndex:
        name = f"{self.prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', space)}_{os.getpid()}_{next(self._serial)}"
        return MilvusIndex(self.client, dim, space=space, collection=name)

    def close(self) -> None:
        self.client.close()
