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

Two ways to own collections:
- `SharedSpaces` (what ``BACKFILL_INDEX_BACKEND=milvus`` uses): one stable collection per space,
  ``backfill_<space>_<hash of space>``, shared by every API process and surviving restarts; exactly one
  process writes them (the follower holding the writer lease, service/index_writer.py), the others only
  search them (`writes=False`: their sides keep the id bitmap that Postgres implies, never a vector). The
  writer reconciles a collection with Postgres at start, on a layout change and periodically
  (`begin_reconcile` / `finish_reconcile`), and stamps the layout it reconciled in the collection's
  properties; a reader swaps to a layout only once its collections carry that stamp.
- `MilvusSpaces`: per-process collections named with the pid and a counter, dropped when retired (the first
  slice's mode; the backend's unit tests use it).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from service.ids import IdSet, as_ids, as_vecs

log = logging.getLogger(__name__)

ID, VEC = "id", "vec"
MAX_TOPK = 16_384  # Milvus's limit on a search's `limit`
WRITE_CHUNK = 10_000  # rows per insert/upsert call (keeps each gRPC message well under Milvus's 64 MiB)
# Rows written (upserted or deleted) after which the collection is flushed: Milvus searches unflushed (growing)
# rows without their index, and on milvus-lite that cost grows fast (20k unflushed 64-d rows: about 470 ms a
# query, against about 30 ms once flushed); a flush costs about 0.1-0.2 s, under the write lock.
FLUSH_ROWS = 2048
FETCH_CHUNK = 1_000  # ids per `id in [...]` query when a reconciliation compares vectors
# Test-only fault (tests/integration/test_milvus_shared.py): a writer with this variable set to
# ``kill-before-old-delete`` SIGKILLs itself on its first delete outside a reconciliation, i.e. after a moving
# batch's NEW upsert and before its OLD delete, with the Postgres commit already visible.
FAULT_ENV = "BACKFILL_MILVUS_FAULT"
RETIRED_AT = "retired_at"  # a shared collection's property: when the writer found its space unused (0: in use)


def connect(uri: str) -> Any:
    """A `MilvusClient`; a path that is not a URL is a milvus-lite file, started in this process."""
    from pymilvus import MilvusClient

    # milvus-lite has no MVCC timestamp for iterators: pymilvus warns on every `engine_ids` scan, harmlessly.
    logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
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
    """One embedding space's collection; ids are item ids. Not thread-safe: `IndexSet` locks it.

    `shared`: open the collection if it exists (its stamped space must match), never drop it. `writes=False`:
    a reader's side, whose add/remove change only the id bitmap (what Postgres says the side holds)."""

    def __init__(
        self, client: Any, dim: int, *, space: str, collection: str, shared: bool = False, writes: bool = True
    ) -> None:
        self.client = client
        self.dim = dim
        self.space = space
        self.collection = collection
        self.shared = shared
        self.writes = writes
        self._ids = IdSet()
        self._unflushed = 0
        self._fault = os.environ.get(FAULT_ENV, "")
        # During a reconciliation: the ids the collection held when it began, and what it changed.
        self._engine_at_start: IdSet | None = None
        self.repairs = {"inserted": 0, "replaced": 0, "deleted": 0}
        if shared and client.has_collection(collection):
            stamped = client.describe_collection(collection).get("properties", {}).get("space")
            if stamped != space:
                raise RuntimeError(f"collection {collection} holds space {stamped!r}, not {space!r}")
            return
        if not shared and client.has_collection(collection):  # a leftover of a crashed process with this pid
            client.drop_collection(collection)
        self._create()

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID, DataType.INT64, is_primary=True)
        schema.add_field(VEC, DataType.FLOAT_VECTOR, dim=self.dim)
        params = self.client.prepare_index_params()
        params.add_index(field_name=VEC, index_type="FLAT", metric_type="L2")
        self.client.create_collection(
            self.collection,
            schema=schema,
            index_params=params,
            consistency_level="Session",
            properties={"space": self.space},
        )

    # --- size and membership -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._ids

    def ids(self) -> set[int]:
        return self._ids.to_set()

    def engine_id_chunks(self) -> Iterator[np.ndarray]:
        """Every id the collection itself holds, a scan of its primary keys in chunks of `WRITE_CHUNK`."""
        it = self.client.query_iterator(
            self.collection, batch_size=WRITE_CHUNK, filter=f"{ID} >= 0", output_fields=[ID]
        )
        try:
            while rows := it.next():
                yield np.fromiter((r[ID] for r in rows), dtype=np.int64, count=len(rows))
        finally:
            it.close()

    def engine_ids(self) -> np.ndarray:
        """Every id the collection itself holds, as one array."""
        return np.concatenate([np.zeros(0, dtype=np.int64), *self.engine_id_chunks()])

    def fetch(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """The collection's vectors of `ids` (absent ids are missing from the answer)."""
        out: dict[int, np.ndarray] = {}
        for a in range(0, ids.size, FETCH_CHUNK):
            chunk = ids[a : a + FETCH_CHUNK].tolist()
            for r in self.client.query(self.collection, filter=f"{ID} in {chunk}", output_fields=[ID, VEC]):
                out[int(r[ID])] = np.asarray(r[VEC], dtype=np.float32)
        return out

    def stamp(self, key: str) -> None:
        """Record in the collection's properties the layout a reconciliation brought it to."""
        self.client.alter_collection_properties(self.collection, properties={"layout": key})

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
        self._ids.add(ids_a)
        if not self.writes:
            return
        if self._engine_at_start is not None:
            ids_a, v = self._differing(ids_a, v)
        for a in range(0, ids_a.size, WRITE_CHUNK):
            chunk_ids, chunk_vecs = ids_a[a : a + WRITE_CHUNK], v[a : a + WRITE_CHUNK]
            rows = [{ID: int(i), VEC: vec} for i, vec in zip(chunk_ids, chunk_vecs, strict=True)]
            self.client.upsert(self.collection, rows)
        self._wrote(ids_a.size)

    def _differing(self, ids: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A reconciliation's add: only the rows the collection lacks or holds with another vector."""
        assert self._engine_at_start is not None
        held = self._engine_at_start.mask(ids)
        stored = self.fetch(ids[held])
        write = ~held
        self.repairs["inserted"] += int(write.sum())
        for j in np.flatnonzero(held):
            got = stored.get(int(ids[j]))
            if got is None or not np.allclose(got, v[j], rtol=1e-5, atol=1e-6):
                write[j] = True
                self.repairs["inserted" if got is None else "replaced"] += 1
        return ids[write], v[write]

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Delete item ids (absent ones are ignored); returns how many were present. In a reconciliation the
        delete waits for `finish_reconcile`, after every insert."""
        gone = self._ids.discard(as_ids(ids))
        if gone.size and self.writes and self._engine_at_start is None:
            if self._fault == "kill-before-old-delete":
                os.kill(os.getpid(), signal.SIGKILL)
            self._delete(gone)
        return int(gone.size)

    def _delete(self, ids: np.ndarray) -> None:
        for a in range(0, ids.size, WRITE_CHUNK):
            self.client.delete(self.collection, ids=ids[a : a + WRITE_CHUNK].tolist())
        self._wrote(ids.size)

    def _wrote(self, rows: int) -> None:
        self._unflushed += rows
        if self._unflushed >= FLUSH_ROWS:
            self.client.flush(self.collection)
            self._unflushed = 0

    # --- reconciliation (the shared collections' writer) ------------------------------------------------
    def begin_reconcile(self) -> None:
        """From now until `finish_reconcile`, adds write only what the collection lacks or holds otherwise,
        and deletes wait."""
        self._engine_at_start = IdSet()
        for chunk in self.engine_id_chunks():  # 1 byte per id in the bitmap, never a list of every id
            self._engine_at_start.add(chunk)
        self.repairs = {"inserted": 0, "replaced": 0, "deleted": 0}

    def finish_reconcile(self) -> dict[str, int]:
        """Delete what the collection held at the start and Postgres no longer puts here (moved items, deleted
        ones, leftovers of a crash or of another layout); returns the repairs."""
        assert self._engine_at_start is not None
        held = np.fromiter(self._engine_at_start.to_set(), dtype=np.int64)
        extra = held[~self._ids.mask(held)] if held.size else held
        self._engine_at_start = None
        if extra.size:
            self._delete(extra)
        self.repairs["deleted"] = int(extra.size)
        if self._unflushed:
            self.client.flush(self.collection)
            self._unflushed = 0
        return dict(self.repairs)

    # --- reads ---------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(M, dim) queries -> (M, k) squared-L2 distances and item ids, -1 / +inf where fewer exist."""
        d, i, _ = self._search(queries, k, vectors=False)
        return d, i

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`search`, plus each hit's stored vector (M, k, dim; zeros where empty)."""
        d, i, v = self._search(queries, k, vectors=True)
        assert v is not None
        return d, i, v

    def _search(self, queries: np.ndarray, k: int, vectors: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        q = as_vecs(queries, self.dim)
        m = q.shape[0]
        out_d = np.full((m, k), np.inf, dtype=np.float32)
        out_i = np.full((m, k), -1, dtype=np.int64)
        out_v = np.zeros((m, k, self.dim), dtype=np.float32) if vectors else None
        # Shared: the collection may hold ids this process has not read from Postgres yet (or still hold
        # moved ones): ask the engine for k, not for what the bitmap counts.
        limit = min(k, MAX_TOPK) if self.shared else min(k, len(self._ids), MAX_TOPK)
        if m == 0 or limit <= 0:
            return out_d, out_i, out_v
        hits = self.client.search(
            self.collection,
            data=list(q),
            limit=limit,
            anns_field=VEC,
            search_params={"metric_type": "L2"},
            output_fields=[ID, VEC] if vectors else [ID],
        )
        for row, found in enumerate(hits):
            n = len(found)
            out_i[row, :n] = [h[ID] for h in found]
            out_d[row, :n] = [h["distance"] for h in found]
            if out_v is not None and n:
                out_v[row, :n] = [h["entity"][VEC] for h in found]
        return out_d, out_i, out_v

    def close(self) -> None:
        """Drop the collection (a retired layout's space); a shared collection stays."""
        if not self.shared:
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


def collection_name(prefix: str, space: str) -> str:
    """A stable, valid collection name for a space: its letters plus a hash (``v1->v2`` and ``v1__v2`` differ)."""
    digest = hashlib.sha1(space.encode()).hexdigest()[:8]
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', space)}_{digest}"


class SharedSpaces:
    """The shared collections on one Milvus (a `SpaceMaker`): one per space, stable across processes and
    restarts. `writes` says whether this process is the writer (set by the follower from the writer lease)."""

    shared = True

    def __init__(self, uri: str, prefix: str = "backfill") -> None:
        self.uri = uri
        self.prefix = prefix
        self.client = connect(uri)
        self.writes = False

    def __call__(self, dim: int, space: str) -> MilvusIndex:
        name = collection_name(self.prefix, space)
        return MilvusIndex(self.client, dim, space=space, collection=name, shared=True, writes=self.writes)

    def stamped(self, space: str) -> str | None:
        """The layout last reconciled into a space's collection (None: never, or no such collection)."""
        name = collection_name(self.prefix, space)
        if not self.client.has_collection(name):
            return None
        return self.client.describe_collection(name).get("properties", {}).get("layout")

    def retire_unused(self, keep: Iterable[str], grace_seconds: float, now: float | None = None) -> list[str]:
        """Drop the shared collections of spaces no layout uses any more (the writer calls it after each
        reconciliation; Postgres still holds their vectors). A collection of this prefix whose space is not in
        `keep` is marked retired (a property holding the time) by the first call that finds it unused and
        dropped by the first call at least `grace_seconds` later, so a reader still serving the previous
        layout keeps its collections meanwhile; a space used again before that is unmarked. Collections that
        are not a space's shared one (another process's `MilvusSpaces`) are left alone. Returns the names
        dropped."""
        now = time.time() if now is None else now
        wanted = {collection_name(self.prefix, space) for space in keep}
        dropped: list[str] = []
        for name in self.client.list_collections():
            if not name.startswith(f"{self.prefix}_"):
                continue
            props = self.client.describe_collection(name).get("properties", {})
            if name != collection_name(self.prefix, str(props.get("space", ""))):
                continue
            retired = float(props.get(RETIRED_AT) or 0.0)
            if name in wanted:
                if retired:
                    self.client.alter_collection_properties(name, properties={RETIRED_AT: "0"})
            elif not retired:
                self.client.alter_collection_properties(name, properties={RETIRED_AT: f"{now:.3f}"})
                log.info(
                    "shared collection %s is no longer used: dropped in %.0f s unless used again", name, grace_seconds
                )
            elif now - retired >= grace_seconds:
                self.client.drop_collection(name)
                dropped.append(name)
                log.warning("dropped the retired shared collection %s (unused since %.0f s)", name, now - retired)
        return dropped

    def close(self) -> None:
        self.client.close()
