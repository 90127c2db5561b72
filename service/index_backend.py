"""The index backend boundary: what one side (OLD or NEW) of an `IndexSet` must offer, and which engine
holds it (setting ``BACKFILL_INDEX_BACKEND``).

- ``faiss`` (default): `service.index.VectorIndex`, in-process FAISS, CPU or GPU.
- ``milvus``: `service.milvus_index.MilvusIndex`, one Milvus collection per embedding space, reached by
  ``BACKFILL_MILVUS_URI`` (a milvus-lite file, the default, or a Milvus server's URI).

Both keep item ids as the engine's ids and return squared-L2 distances, so the merge and its calibration
are the same on either. FAISS is rebuilt from Postgres by every process when the layout changes; the Milvus
collections are shared by every process and survive restarts: one writer applies the embeddings table to
them and reconciles them with Postgres (service/ingest.py, service/index_writer.py). Postgres stays the
only source of truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from service.config import Settings


class SpaceIndex(Protocol):
    """One embedding space keyed by item id. Not thread-safe: `IndexSet` locks it."""

    dim: int
    space: str

    def __len__(self) -> int: ...

    def __contains__(self, item_id: object) -> bool: ...

    def ids(self) -> set[int]: ...

    def add(self, ids: Iterable[int] | np.ndarray, vecs: np.ndarray) -> None:
        """Add vectors under item ids; an id already present is replaced (a repeated id keeps its last)."""

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove item ids (absent ones are ignored); returns how many were present."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(M, dim) queries -> (M, k) squared-L2 distances and item ids, ascending, -1 / +inf where fewer."""

    def close(self) -> None:
        """Release what the engine holds for this space (nothing for in-process FAISS)."""


# (dim, space) -> an empty index for that space.
SpaceMaker = Callable[[int, str], SpaceIndex]


def space_maker(settings: Settings) -> SpaceMaker | None:
    """The maker for a non-default backend; None for FAISS (the follower builds `VectorIndex` itself, from
    the FAISS settings, exactly as before the boundary existed)."""
    if settings.index_backend == "faiss":
        return None
    from service.milvus_index import SharedSpaces

    return SharedSpaces(settings.milvus_uri or str(settings.data_dir / "milvus.db"))
