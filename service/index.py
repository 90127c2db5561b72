"""FAISS indices keyed by item id, one per embedding space, and the OLD/NEW pair of a rollout.

`VectorIndex` is one embedding space: FAISS ids are item ids, with add (replace on a known id), remove and
exact k-NN (squared L2). Index types come from a FAISS factory string:

- ``Flat`` (default): ``IndexIDMap(IndexFlatL2)``, exact, native removal.
- ``IVF<n>,...``: native ids and removal. Until the space holds enough vectors to train n lists
  (``MIN_POINTS_PER_CENTROID`` per list) it is served by an exact ``IndexIDMap(IndexFlatL2)``; the first
  add that crosses that size trains the IVF on every vector held and moves them in. A start-up rebuild
  (batches of ``rebuild_batch_size``) thus trains on a real sample, not on its first batch, and a small
  gallery stays exact.
  Compressed lists (``IVF1024,PQ16``: 16 bytes of code per vector) work the same way; their staging
  threshold also covers the PQ codebooks (``2**nbits`` centroids per sub-quantizer, 39 points each).
- ``IVF<n>,...,RFlat``: the IVF index above plus exact re-ranking: the top ``k_factor * k`` candidates
  (``k_factor=<n>`` in the search parameters, default ``DEFAULT_K_FACTOR``) are re-ranked by squared L2 to
  the item's float32 vector, kept by item id beside the index. FAISS's own ``IndexRefineFlat`` has neither
  ids nor removal, so the service builds the refine itself; other refine forms are refused at start-up.
- ``HNSW<m>`` and every GPU index: no native removal, so removed ids become tombstones filtered out of
  results (the search over-fetches by the tombstone count) and the index is rebuilt from a host copy
  of its vectors once tombstones pass a fraction of it.

`IndexSet` is what a query sees: the single index outside a rollout, OLD and NEW during one, with a
readers-writer lock. Writers (ingestion) change both sides of a batch under the write lock, so a reader
holding the read lock sees every live item on exactly one side (invariant 1 of docs/design.md). A layout
change (rollout start, completion, abort) builds a whole new `IndexSet` off to the side and swaps the
manager's reference; a query that took the old reference keeps a consistent (if stale) view.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from service.ids import ExternalIds, IdSet, as_ids, as_vecs
from service.index_backend import SpaceIndex
from service.rescore import ItemVectors, rescore, rescore_vectors

log = logging.getLogger(__name__)

TOMBSTONE_REBUILD_FRACTION = 0.2
TOMBSTONE_REBUILD_MIN = 1024
MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this
DEFAULT_K_FACTOR = 4  # ",RFlat": candidates re-ranked per result, unless search params say k_factor=<n>
_RFLAT = re.compile(r"^(.+?),\s*RFlat$", flags=re.IGNORECASE)
# Searches of at most this many queries run on one OpenMP thread. FAISS's thread count is per calling
# thread and defaults to every core in a request thread (uvicorn's pool): for one query the OpenMP team
# costs more than it saves, badly so on a busy host (the bench: 100k Flat, 28 ms -> 0.7 ms).
OMP_SERIAL_MAX_QUERIES = 16
_omp_local = threading.local()


def _omp_for(m: int) -> None:
    """One OpenMP thread for a small batch in this thread; restore the thread's previous count after."""
    saved = getattr(_omp_local, "saved", None)
    if m <= OMP_SERIAL_MAX_QUERIES:
        if saved is None:
            _omp_local.saved = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
    elif saved is not None:
        faiss.omp_set_num_threads(saved)
        _omp_local.saved = None


def gpu_available(use_gpu: bool) -> bool:
    """faiss-gpu with at least one visible GPU, and the setting allows it (decided at run time)."""
    if not use_gpu:
        return False
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # a CPU build without the symbol, a broken driver
        return False


_gpu_res: object | None = None
_gpu_lock = threading.Lock()


def _gpu_resources() -> object:
    global _gpu_res
    with _gpu_lock:
        if _gpu_res is None:
            _gpu_res = faiss.StandardGpuResources()
        return _gpu_res


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers so ingestion never starves."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class VectorIndex:
    """One embedding space's index; FAISS ids are item ids. Not thread-safe: `IndexSet` locks it."""

    def __init__(
        self, dim: int, factory: str = "Flat", *, space: str = "", use_gpu: bool = False, search_params: str = ""
    ) -> None:
        self.dim = dim
        self.space = space  # the model version (or "v1->v2" for forward-transformed vectors) it holds
        self.factory = factory.strip() or "Flat"
        refine = _RFLAT.match(self.factory)
        # ",RFlat": the base index's candidates re-ranked against exact vectors kept here by item id
        self._exact = ItemVectors(dim) if refine else None
        self._base = refine.group(1) if refine else self.factory
        self._kind = self._classify(self._base)
        # GPU for exact (Flat) search only; IVF/HNSW stay on the CPU where removal/HNSW are supported.
        self.on_gpu = self._kind == "flat" and gpu_available(use_gpu)
        # Tombstone mode keeps sequential internal positions -> item ids and a host copy of the vectors.
        self.tombstones = self.on_gpu or self._kind == "hnsw"
        self._ids = IdSet()
        self._dead: set[int] = set()
        self._pos_ids = np.zeros(0, dtype=np.int64)
        self._host = np.zeros((0, dim), dtype=np.float32)
        self._index = self._new_index(self._base)
        self.set_search_params(search_params)

    def set_search_params(self, search_params: str) -> None:
        """Search parameters, e.g. "nprobe=16" (IVF) or "efSearch=128" (HNSW) for FAISS, and "k_factor=<n>"
        (this class's own, for ",RFlat"); "" = FAISS's defaults and `DEFAULT_K_FACTOR`."""
        params = [p for p in search_params.replace(" ", "").split(",") if p]
        kf = [int(p.split("=", 1)[1]) for p in params if p.lower().startswith("k_factor=")]
        self.k_factor = max(1, kf[-1]) if kf else DEFAULT_K_FACTOR
        self.search_params = ",".join(p for p in params if not p.lower().startswith("k_factor="))
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        """FAISS search parameters for the ANN index; the exact (staging, Flat) ones have none."""
        if self.search_params and (self._kind == "hnsw" or isinstance(self._index, faiss.IndexIVF)):
            space: Any = faiss.ParameterSpace()  # the stubs miss the (index, "name=value,...") overload
            space.set_index_parameters(self._index, self.search_params)

    @staticmethod
    def _classify(factory: str) -> str:
        f = factory.upper()
        if f.startswith("IVF"):
            return "ivf"
        if "HNSW" in f:
            return "hnsw"
        return "flat"

    def _new_index(self, factory: str) -> faiss.Index:
        if self.tombstones:
            if self.on_gpu:
                return faiss.GpuIndexFlatL2(_gpu_resources(), self.dim, faiss.GpuIndexFlatConfig())  # type: ignore[call-overload]
            return faiss.index_factory(self.dim, factory, faiss.METRIC_L2)
        if self._kind == "ivf":  # staged: exact until `_promote_if_ready` trains the IVF
            return faiss.IndexIDMap(faiss.IndexFlatL2(self.dim))
        # IndexIDMap, not IndexIDMap2: nothing reconstructs by id, and the reverse map costs ~40 B/item.
        return faiss.IndexIDMap(faiss.index_factory(self.dim, factory, faiss.METRIC_L2))

    # --- size and membership -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._ids

    def ids(self) -> set[int]:
        return self._ids.to_set()

    def memory_bytes(self) -> int:
        """The index's size as FAISS serialises it (codes, ids, centroids, codebooks), plus the exact vectors
        of a re-ranking index and the host copy of a tombstone one; not the id bitmap (1 B per item id)."""
        size = int(faiss.serialize_index(self._index).size) if not self.on_gpu else 0
        if self._exact is not None:
            size += self._exact.nbytes()
        return size + int(self._host.nbytes + self._pos_ids.nbytes)

    def close(self) -> None:
        """Nothing to release: the index is this object's memory."""

    # --- writes --------------------------------------------------------------------------------------
    @property
    def staged(self) -> bool:
        """An IVF space still served by its exact staging index (too few vectors to train yet)."""
        return self._kind == "ivf" and not isinstance(self._index, faiss.IndexIVF)

    def _promote_if_ready(self) -> None:
        m = re.match(r"IVF(\d+)", self._base, flags=re.IGNORECASE)
        nlist = int(m.group(1)) if m else 1
        pq = re.search(r",PQ\d+(?:x(\d+))?", self._base, flags=re.IGNORECASE)  # codebooks of 2**nbits
        centroids = max(nlist, 2 ** int(pq.group(1) or 8)) if pq else nlist
        n = self._index.ntotal
        if n < centroids * MIN_POINTS_PER_CENTROID:
            return
        staging = self._index
        assert isinstance(staging, faiss.IndexIDMap)
        ids = faiss.vector_to_array(staging.id_map).astype(np.int64)
        vecs = staging.index.reconstruct_n(0, n)
        ivf = faiss.index_factory(self.dim, self._base, faiss.METRIC_L2)
        if isinstance(ivf, faiss.IndexIVFPQ):
            # The factory turns polysemous training on: it serves only polysemous_ht search (unused here) and
            # was most of the training time (12k x 16-d vectors: 13 s -> 3 s).
            ivf.do_polysemous_training = False  # type: ignore[attr-defined]
        ivf.train(vecs)
        ivf.add_with_ids(vecs, ids)
        self._index = ivf
        self._apply_search_params()
        log.info("IVF index %s trained on %d vectors (space %s)", self._base, n, self.space)

    def add(self, ids: Iterable[int] | np.ndarray, vecs: np.ndarray) -> None:
        """Add vectors under item ids; an id already present is replaced."""
        ids_a = as_ids(ids)
        v = as_vecs(vecs, self.dim)
        if ids_a.shape[0] != v.shape[0]:
            raise ValueError("ids and vectors differ in length")
        if ids_a.size == 0:
            return
        if np.unique(ids_a).size != ids_a.size:  # keep the last vector of a repeated id
            _, last = np.unique(ids_a[::-1], return_index=True)
            keep = np.sort(ids_a.size - 1 - last)
            ids_a, v = ids_a[keep], v[keep]
        present = ids_a[self._ids.mask(ids_a)]
        if present.size:
            self.remove(present)
        if self.tombstones:
            revived = self._dead.intersection(int(i) for i in ids_a)
            if revived:  # an id must map to one live position: compact away its dead copy first
                self._compact()
            self._index.add(v)
            self._pos_ids = np.concatenate([self._pos_ids, ids_a])
            self._host = np.concatenate([self._host, v])
        else:
            self._index.add_with_ids(v, ids_a)
        if self._exact is not None:
            self._exact.add(ids_a, v)
        self._ids.add(ids_a)
        if self.staged:
            self._promote_if_ready()

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove item ids (absent ones are ignored); returns how many were present."""
        gone = self._ids.discard(as_ids(ids))
        if not gone.size:
            return 0
        if self.tombstones:
            self._dead.update(int(i) for i in gone)
            if len(self._dead) > max(TOMBSTONE_REBUILD_MIN, TOMBSTONE_REBUILD_FRACTION * len(self._pos_ids)):
                self._compact()
        else:
            self._index.remove_ids(gone)  # type: ignore[arg-type]
            if self._exact is not None:
                self._exact.remove(gone)
        return int(gone.size)

    def _compact(self) -> None:
        """Tombstone mode: rebuild the index from the host copy without dead positions."""
        keep = ~np.isin(self._pos_ids, np.fromiter(self._dead, dtype=np.int64, count=len(self._dead)))
        self._pos_ids = self._pos_ids[keep]
        self._host = np.ascontiguousarray(self._host[keep])
        self._dead.clear()
        self._index = self._new_index(self._base)
        self._apply_search_params()
        if len(self._pos_ids):
            self._index.add(self._host)

    # --- reads ---------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(M, dim) queries -> (M, k) squared-L2 distances and item ids, -1 / +inf where fewer exist."""
        q = as_vecs(queries, self.dim)
        m = q.shape[0]
        n = self._index.ntotal
        _omp_for(m)
        if self._exact is not None and not self.staged and n and k > 0 and m:
            # Exact re-ranking of the compressed index's top k_factor * k (the staging index is exact).
            _, cand = self._index.search(q, self.k_factor * k)
            return rescore(q, cand, self._exact, k)
        if not self.tombstones and n >= k > 0 and m:
            # The common case, on every query's path: FAISS's arrays as they are.
            d, i = self._index.search(q, k)
            if (i < 0).any():  # IVF/HNSW may find fewer than k
                d[i < 0] = np.inf
            return d, i
        out_d = np.full((m, k), np.inf, dtype=np.float32)
        out_i = np.full((m, k), -1, dtype=np.int64)
        if n == 0 or m == 0 or k <= 0:
            return out_d, out_i
        if not self.tombstones:
            kk = n
            d, i = self._index.search(q, kk)
            out_d[:, :kk], out_i[:, :kk] = d, i
            out_d[out_i < 0] = np.inf
            return out_d, out_i
        kk = min(n, k + len(self._dead))
        d, pos = self._index.search(q, kk)
        ids = np.where(pos >= 0, self._pos_ids[np.clip(pos, 0, None)], -1)
        if self._dead:
            dead = np.fromiter(self._dead, dtype=np.int64, count=len(self._dead))
            ids = np.where(np.isin(ids, dead), -1, ids)
        for row in range(m):
            ok = ids[row] >= 0
            take = min(k, int(ok.sum()))
            out_d[row, :take] = d[row][ok][:take]
            out_i[row, :take] = ids[row][ok][:take]
        return out_d, out_i


@dataclass(frozen=True)
class Layout:
    """Which indices exist and what they hold, read from the database (docs/rollout-semantics.md).

    Outside a rollout: one index (`new`) of `serving`. During a rollout from -> to, by path (`mode`,
    models/paths.py): NEW holds `to` vectors, OLD `from` vectors (reverse, two-pass) or h(from) vectors
    (forward); on the old-only path there is no NEW and OLD holds every item's `from` vector."""

    serving: str | None
    rollout_id: int | None = None
    from_model: str | None = None
    to_model: str | None = None
    mode: str | None = None

    @property
    def in_rollout(self) -> bool:
        return self.rollout_id is not None

    @property
    def new_model(self) -> str | None:
        """The model whose vectors NEW holds (and whose pass searches it); None on the old-only path."""
        if not self.in_rollout:
            return self.serving
        return None if self.mode == "old-only" else self.to_model

    @property
    def old_query_model(self) -> str | None:
        """The model whose pass searches OLD (through psi in reverse mode); None outside a rollout."""
        if not self.in_rollout:
            return None
        return self.from_model if self.mode in ("two-pass", "old-only") else self.to_model

    @property
    def query_model(self) -> str | None:
        """The model answering queries: the rollout's target during a rollout, except on the old-only path."""
        return self.new_model if self.new_model is not None else self.old_query_model

    @property
    def encoder_passes(self) -> int:
        return len({m for m in (self.new_model, self.old_query_model) if m is not None})

    @property
    def new_space(self) -> str | None:
        return self.new_model

    @property
    def old_space(self) -> str | None:
        if not self.in_rollout:
            return None
        return f"{self.from_model}->{self.to_model}" if self.mode == "forward" else self.from_model


@dataclass
class IndexSet:
    """The indices a query searches, with the lock that keeps OLD/NEW moves atomic for readers."""

    layout: Layout
    new: SpaceIndex | None  # a `VectorIndex` (FAISS) or another backend's (service/index_backend.py)
    old: SpaceIndex | None = None
    # Reverse path: h(v1) of every OLD item, to re-score OLD's top `rescore_depth * k` in the new space
    # (service/rescore.py); None on the other paths, or with re-scoring off.
    rescore_vectors: ItemVectors | None = None
    rescore_depth: int = 0
    # The shared (milvus) index instead: h applied per query to the v1 vectors OLD's search returns.
    rescore_h: Callable[[np.ndarray], np.ndarray] | None = None
    lock: RWLock = field(default_factory=RWLock)

    def sides(self) -> dict[str, int]:
        with self.lock.read():
            out = {"new": len(self.new) if self.new is not None else 0}
            out["old"] = len(self.old) if self.old is not None else 0
            return out

    def backfilled_fraction(self) -> float:
        """Share of the live gallery already in the target space (1.0 outside a rollout)."""
        if not self.layout.in_rollout:
            return 1.0
        s = self.sides()
        total = s["new"] + s["old"]
        return s["new"] / total if total else 0.0

    def side_of(self, item_id: int) -> str | None:
        with self.lock.read():
            if self.new is not None and item_id in self.new:
                return "new"
            if self.old is not None and item_id in self.old:
                return "old"
            return None

    # --- writes (ingestion) --------------------------------------------------------------------------
    def apply(
        self,
        to_new: tuple[np.ndarray, np.ndarray] | None = None,
        to_old: tuple[np.ndarray, np.ndarray] | None = None,
        remove: Iterable[int] | None = None,
        old_rescore: np.ndarray | None = None,
    ) -> tuple[int, int]:
        """One atomic batch: add/replace `to_new` in NEW (removing those ids from OLD), add `to_old` to OLD
        except ids NEW already holds, and remove `remove` from both. `old_rescore` (rows aligned with
        `to_old`) are the OLD items' re-scoring vectors where the set keeps them. Returns (added to new,
        added to old)."""
        n_new = n_old = 0
        with self.lock.write():
            if remove is not None:
                rm = as_ids(remove)
                if rm.size:
                    for side in (self.new, self.old, self.rescore_vectors):
                        if side is not None:
                            side.remove(rm)
            if to_new is not None and to_new[0].size and self.new is not None:
                ids, vecs = to_new
                # Insert before delete: on an engine that is not this process's memory, a failure between
                # the two leaves the item on both sides (the merge drops the duplicate), never on neither.
                self.new.add(ids, vecs)
                for side in (self.old, self.rescore_vectors):
                    if side is not None:
                        side.remove(ids)
                n_new = int(ids.size)
            if to_old is not None and to_old[0].size and self.old is not None:
                ids, vecs = to_old
                new_side = self.new
                keep = np.array([new_side is None or int(i) not in new_side for i in ids], dtype=bool)
                if keep.any():
                    self.old.add(ids[keep], vecs[keep])
                    if self.rescore_vectors is not None:
                        if old_rescore is None:
                            raise ValueError("this index set re-scores OLD: old_rescore vectors are required")
                        self.rescore_vectors.add(ids[keep], np.asarray(old_rescore)[keep])
                n_old = int(keep.sum())
        return n_new, n_old

    # --- reads (queries) -----------------------------------------------------------------------------
    def search(
        self, q_new: np.ndarray | None, q_old: np.ndarray | None, k: int
    ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
        """Search NEW with `q_new` and OLD with `q_old` under one read lock (a consistent snapshot)."""
        with self.lock.read():
            n = len(q_new) if q_new is not None else len(q_old) if q_old is not None else 0
            new_hits = (
                self.new.search(q_new, k)
                if self.new is not None and q_new is not None
                else (np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int64))
            )
            old_hits = None
            if self.old is not None and q_old is not None:
                if self.rescores and q_new is not None:
                    old_hits = self._rescored(q_new, q_old, k)
                else:
                    old_hits = self.old.search(q_old, k)
            return new_hits, old_hits

    def _rescored(self, q_new: np.ndarray, q_old: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        assert self.old is not None
        depth = self.rescore_depth * k
        if self.rescore_vectors is not None:
            _, cand = self.old.search(q_old, depth)
            return rescore(q_new, cand, self.rescore_vectors, k)
        assert self.rescore_h is not None
        _, cand, v1 = self.old.search_vectors(q_old, depth)  # type: ignore[attr-defined]
        m, c, d = v1.shape
        h = self.rescore_h(v1.reshape(m * c, d)).reshape(m, c, -1)
        return rescore_vectors(q_new, cand, h, cand >= 0, k)

    @property
    def rescores(self) -> bool:
        """OLD's hits are re-scored in the new space (their distances are forward-path distances)."""
        return (self.rescore_vectors is not None or self.rescore_h is not None) and self.rescore_depth > 0


class IndexManager:
    """Holds the current `IndexSet`; a layout change swaps in a freshly built one (a reference swap)."""

    def __init__(self) -> None:
        self._current: IndexSet | None = None
        self.external_ids = ExternalIds()  # item id -> external id (immutable once assigned)

    @property
    def current(self) -> IndexSet | None:
        return self._current

    def swap(self, new_set: IndexSet) -> IndexSet | None:
        old, self._current = self._current, new_set
        return old
