"""Tiny random artifacts (v1: 8-d, v2: 16-d, compat-v1-v2) so service tests never need the shipped ones."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.artifacts import save_compat, save_encoder


class TinyEncoder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(28 * 28, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, dim)
        return nn.functional.normalize(self.fc(self.flat(x)), dim=1)


class Normed(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.fc(x), dim=1)


class Sigma(nn.Module):
    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B,)
        return self.fc(x).squeeze(-1)


V1_DIM, V2_DIM = 8, 16


def make_artifacts(root: Path, seed: int = 0, calibration: dict[str, dict[str, list[float]]] | None = None) -> Path:
    """Write v1/, v2/ and compat-v1-v2/ under `root`; returns `root`."""
    torch.manual_seed(seed)
    save_encoder(TinyEncoder(V1_DIM), root / "v1", {"name": "v1", "dim": V1_DIM})
    save_encoder(TinyEncoder(V2_DIM), root / "v2", {"name": "v2", "dim": V2_DIM})
    manifest: dict[str, object] = {"from": "v1", "to": "v2", "from_dim": V1_DIM, "to_dim": V2_DIM}
    if calibration is not None:
        manifest["calibration"] = calibration
    save_compat(Normed(V2_DIM, V1_DIM), Normed(V1_DIM, V2_DIM), Sigma(V1_DIM), root / "compat-v1-v2", manifest)
    return root
