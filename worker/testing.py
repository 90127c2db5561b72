"""Tiny random artifacts and a seeded gallery, for the worker's tests and for the backfill benchmark when
the shipped artifacts are absent. Not used by the running system."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import sqlalchemy as sa
import torch
import torch.nn.functional as F
from sqlalchemy.orm import Session
from torch import nn

from models.artifacts import artifact_checksum, load_encoder, save_compat, save_encoder
from models.preprocess import encode_png
from service.db.models import CompatPack, Embedding, Item, ModelVersion


class TinyEncoder(nn.Module):
    """Flatten + Linear + L2 normalise; `slow_reps` extra square layers make a batch take measurable time."""

    def __init__(self, dim: int, slow_reps: int = 0, width: int = 784) -> None:
        super().__init__()
        self.slow_reps = slow_reps
        self.mix = nn.Linear(784, 784)
        self.proj = nn.Linear(784, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, dim)
        h = x.flatten(1)
        for _ in range(self.slow_reps):
            h = torch.tanh(self.mix(h))
        return F.normalize(self.proj(h), dim=1)


class Sigma(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, 1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:  # (B, dim) -> (B,)
        return self.lin(v).squeeze(-1)


def make_tiny_artifacts(
    directory: Path, v1_dim: int = 16, v2_dim: int = 24, slow_reps: int = 0, seed: int = 0
) -> dict[str, Path]:
    """Write encoders v1, v2 and compat-v1-v2 (random weights) under `directory`."""
    torch.manual_seed(seed)
    out = {
        "v1": save_encoder(TinyEncoder(v1_dim), directory / "v1", {"name": "v1", "dim": v1_dim}),
        "v2": save_encoder(TinyEncoder(v2_dim, slow_reps), directory / "v2", {"name": "v2", "dim": v2_dim}),
    }
    out["compat"] = save_compat(
        nn.Linear(v2_dim, v1_dim),
        nn.Linear(v1_dim, v2_dim),
        Sigma(v1_dim),
        directory / "compat-v1-v2",
        {"from": "v1", "to": "v2", "from_dim": v1_dim, "to_dim": v2_dim},
    )
    return out


def gallery_images(n: int, seed: int = 0) -> np.ndarray:
    """`n` (28, 28) uint8 images: sklearn's digits upscaled when available, else random blobs."""
    try:
        from sklearn.datasets import load_digits

        digits = load_digits().images  # (1797, 8, 8) in 0..16
        idx = np.arange(n) % len(digits)
        small = (digits[idx] * (255.0 / 16.0)).astype(np.uint8)
        return np.kron(small, np.ones((1, 4, 4), dtype=np.uint8))[:, 2:30, 2:30].copy()
    except ImportError:
        return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def seed_gallery(
    session: Session,
    artifacts: dict[str, Path],
    n_items: int,
    images: np.ndarray | None = None,
    v1_embeddings: bool = True,
) -> list[int]:
    """Register v1 (serving), v2 and their compat pack, insert `n_items` items with v1 embeddings."""
    for name, status in (("v1", "serving"), ("v2", "registered")):
        enc = load_encoder(artifacts[name])
        session.add(
            ModelVersion(
                name=name,
                dim=enc.dim,
                artifact_path=str(artifacts[name]),
                checksum=artifact_checksum(artifacts[name]),
                status=status,
            )
        )
    session.flush()
    session.add(
        CompatPack(
            from_version="v1",
            to_version="v2",
            artifact_path=str(artifacts["compat"]),
            checksum=artifact_checksum(artifacts["compat"]),
        )
    )
    imgs = gallery_images(n_items) if images is None else images
    items = [Item(external_id=f"img-{i}", payload=encode_png(img), label=i % 10) for i, img in enumerate(imgs)]
    session.add_all(items)
    session.flush()
    if v1_embeddings:
        vecs = load_encoder(artifacts["v1"]).embed(imgs)
        session.add_all(
            Embedding(item_id=it.id, model_version="v1", vector=v.astype("<f4").tobytes())
            for it, v in zip(items, vecs, strict=True)
        )
    session.commit()
    return [it.id for it in items]


def embedding_counts(session: Session, version: str) -> tuple[int, int]:
    """(rows, distinct items) of a model's embeddings."""
    rows = session.scalar(sa.select(sa.func.count()).where(Embedding.model_version == version)) or 0
    distinct = (
        session.scalar(
            sa.select(sa.func.count(sa.distinct(Embedding.item_id))).where(Embedding.model_version == version)
        )
        or 0
    )
    return int(rows), int(distinct)
