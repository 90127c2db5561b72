"""A small CNN family of embedding models and their training loop.

``forward`` maps (B, 1, 28, 28) floats in [0, 1] to L2-normalised (B, emb_dim) embeddings (what TorchScript
export and `models.artifacts.Encoder` use). The classifier head (a cosine classifier on the normalised
embedding) is kept on the module for the losses: the compat training classifies through v2's frozen head.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


@dataclass
class EncoderConfig:
    width: int = 16  # channels of the first conv block (doubles per block)
    depth: int = 2  # conv blocks (each halves the resolution)
    emb_dim: int = 32
    n_classes: int = 10
    scale: float = 16.0  # cosine-classifier temperature
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CosineClassifier(nn.Module):
    def __init__(self, dim: int, n_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.1)
        self.scale = scale

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))


class CNNEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size = 1, 28
        for i in range(cfg.depth):
            c = cfg.width * (2**i)
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in, size = c, size // 2
        self.features = nn.Sequential(*layers)
        self.proj = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(c_in * size * size, 4 * cfg.emb_dim),
            nn.BatchNorm1d(4 * cfg.emb_dim),
            nn.ReLU(inplace=True),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )
        self.classifier = CosineClassifier(cfg.emb_dim, cfg.n_classes, cfg.scale)
        self.emb_dim = cfg.emb_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) float in [0, 1] -> (B, emb_dim) L2-normalised."""
        return F.normalize(self.proj(self.features(x)), dim=1)

    @torch.jit.export
    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return self.classifier(emb)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1]."""
    return torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).float().div_(255.0).unsqueeze(1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (one per batch, cheap)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    x = F.pad(x, (2, 2, 2, 2))
    return x[:, :, 2 + dy : 30 + dy, 2 + dx : 30 + dx]


@torch.no_grad()
def embed(model: nn.Module, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    x = to_tensor(images)
    out = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 0), np.float32)


def train_encoder(
    images: np.ndarray, labels: np.ndarray, cfg: EncoderConfig, progress: bool = True, desc: str = "encoder"
) -> tuple[CNNEncoder, dict[str, Any]]:
    """Train with cross-entropy through the cosine classifier (normalised-softmax embeddings)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = CNNEncoder(cfg)
    x_all, y_all = to_tensor(images), torch.from_numpy(labels.astype(np.int64))
    n = len(x_all)
    steps_per_epoch = max(n // cfg.batch_size, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.2
    )
    history: list[float] = []
    t0 = time.monotonic()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=desc, unit="step", disable=not progress, leave=False)
    for _epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        run, cnt = 0.0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            xb, yb = x_all[idx], y_all[idx]
            if cfg.augment:
                xb = augment(xb, gen)
            loss = F.cross_entropy(model.logits(model(xb)), yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss.detach())
            cnt += 1
            bar.update(1)
            if s % 20 == 0:
                bar.set_postfix(loss=f"{run / cnt:.3f}")
        history.append(run / max(cnt, 1))
    bar.close()
    model.eval()
    return model, {"loss_per_epoch": history, "train_seconds": round(time.monotonic() - t0, 1)}


@torch.no_grad()
def accuracy(model: CNNEncoder, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    emb = torch.from_numpy(embed(model, images))
    return float((model.logits(emb).argmax(1).numpy() == labels).mean())
