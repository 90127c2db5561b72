"""Test fakes: tiny random artifacts, stand-in artifacts with the shipped architectures, and a seeded
gallery, for the test suite, the benchmarks and the chaos run. Not used by the running system."""

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

# ------------------------------------------------------------------------------------------ modules


class TinyEncoder(nn.Module):
    """Flatten + Linear + L2 normalise; `slow_reps` extra square layers make a batch take measurable time.

    `mix=False` leaves the square layer out (an identity), so only the projection draws random weights;
    `in_features` is C * H * W of the input it takes (784: the shipped 28 x 28 gray)."""

    def __init__(self, dim: int, slow_reps: int = 0, mix: bool = True, in_features: int = 784) -> None:
        super().__init__()
        self.slow_reps = slow_reps
        self.mix: nn.Module = nn.Linear(in_features, in_features) if mix else nn.Identity()
        self.proj = nn.Linear(in_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, dim)
        h = x.flatten(1)
        for _ in range(self.slow_reps):
            h = torch.tanh(self.mix(h))
        return F.normalize(self.proj(h), dim=1)


class Normed(nn.Module):
    """Linear + L2 normalise (a compat map psi or h)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(x), dim=1)


class Sigma(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, 1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:  # (B, dim) -> (B,)
        return self.lin(v).squeeze(-1)


# ---------------------------------------------------------------------------------------- artifacts


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


V1_DIM, V2_DIM = 8, 16


def make_artifacts(root: Path, seed: int = 0, calibration: dict[str, dict[str, list[float]]] | None = None) -> Path:
    """Tiny random artifacts for service tests (v1: 8-d, v2: 16-d, normalised compat maps, an optional
    calibration in the manifest): v1/, v2/ and compat-v1-v2/ under `root`; returns `root`."""
    torch.manual_seed(seed)
    save_encoder(TinyEncoder(V1_DIM, mix=False), root / "v1", {"name": "v1", "dim": V1_DIM})
    save_encoder(TinyEncoder(V2_DIM, mix=False), root / "v2", {"name": "v2", "dim": V2_DIM})
    manifest: dict[str, object] = {"from": "v1", "to": "v2", "from_dim": V1_DIM, "to_dim": V2_DIM}
    if calibration is not None:
        manifest["calibration"] = calibration
    save_compat(Normed(V2_DIM, V1_DIM), Normed(V1_DIM, V2_DIM), Sigma(V1_DIM), root / "compat-v1-v2", manifest)
    return root


def standin_artifacts(directory: Path) -> dict[str, Path]:
    """Random-weight encoders with the shipped architectures, so the encoder's cost is realistic."""
    from models.encoders import CNNEncoder
    from models.train import Recipe

    torch.manual_seed(0)
    cfg = Recipe()
    out = {}
    for name, ecfg in (("v1", cfg.v1), ("v2", cfg.v2)):
        out[name] = save_encoder(CNNEncoder(ecfg).eval(), directory / name, {"name": name, "dim": ecfg.emb_dim})
    d1, d2 = cfg.v1.emb_dim, cfg.v2.emb_dim
    sigma = nn.Sequential(nn.Linear(d1, 1), nn.Flatten(0))
    out["compat"] = save_compat(
        nn.Linear(d2, d1),
        nn.Linear(d1, d2),
        sigma,
        directory / "compat-v1-v2",
        {"from": "v1", "to": "v2", "from_dim": d1, "to_dim": d2},
    )
    return out


# ------------------------------------------------------------------------------------------ gallery


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
