"""Two families of embedding models (a small CNN and a small MLP-Mixer) and their training loop.

``forward`` maps (B, 1, 28, 28) floats in [0, 1] to L2-normalised (B, emb_dim) embeddings (what TorchScript
export and `models.artifacts.Encoder` use). The classifier head (a cosine classifier on the normalised
embedding) is kept on the module for the losses: the compat training classifies through v2's frozen head.

`EncoderConfig.arch` picks the family: "cnn" (`width` channels in the first conv block, doubling over
`depth` blocks that each halve the resolution) or "mixer" (4x4 patches -> 49 tokens of `width` channels,
`depth` Mixer blocks, mean-pooled). `classes` lists the dataset labels the encoder is trained on (its head
has one output per entry, in that order); None = every label of the training data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

N_LABELS = 10  # Fashion-MNIST and digits both have labels 0-9
ARCH_DEFAULTS: dict[str, dict[str, int]] = {"cnn": {"width": 16, "depth": 3}, "mixer": {"width": 64, "depth": 4}}
"""`width` / `depth` an encoder gets when it switches to this arch from a recipe of another arch."""
MAX_CNN_DEPTH = 4  # 28 -> 14 -> 7 -> 3 -> 1


class ConfigError(ValueError):
    """An invalid `EncoderConfig` field; `field` names it (the CLI maps it onto its option)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class EncoderConfig:
    width: int = 16  # cnn: channels of the first conv block (doubles per block); mixer: token channels
    depth: int = 2  # cnn: conv blocks (each halves the resolution); mixer: Mixer blocks
    emb_dim: int = 32
    n_classes: int = 10  # outputs of the classifier head (= len(classes) when classes is set)
    scale: float = 16.0  # cosine-classifier temperature
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0
    arch: str = "cnn"
    classes: tuple[int, ...] | None = None  # dataset labels trained on, in head order; None = all

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, n_labels: int = N_LABELS) -> None:
        """Raise `ConfigError` naming the first invalid field."""
        if self.arch not in ARCHS:
            raise ConfigError("arch", f"{self.arch!r} is not one of {', '.join(ARCHS)}")
        for name, low in (("width", 1), ("depth", 1), ("emb_dim", 2), ("epochs", 1), ("batch_size", 2)):
            if int(getattr(self, name)) < low:
                raise ConfigError(name, f"must be at least {low}, got {getattr(self, name)}")
        if self.arch == "cnn" and self.depth > MAX_CNN_DEPTH:
            raise ConfigError("depth", f"a cnn has at most {MAX_CNN_DEPTH} blocks on 28x28 inputs, got {self.depth}")
        for name in ("scale", "lr"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be non-negative, got {self.weight_decay}")
        if self.classes is not None:
            check_classes(self.classes, n_labels)
            if self.n_classes != len(self.classes):
                raise ConfigError("classes", f"{len(self.classes)} classes but n_classes={self.n_classes}")


def check_classes(classes: tuple[int, ...] | list[int], n_labels: int = N_LABELS) -> None:
    bad = [c for c in classes if not 0 <= int(c) < n_labels]
    if bad:
        raise ConfigError("classes", f"class ids must lie in 0-{n_labels - 1}, got {bad}")
    dup = sorted({int(c) for c in classes if list(classes).count(c) > 1})
    if dup:
        raise ConfigError("classes", f"duplicate class ids {dup}")
    if len(classes) < 2:
        raise ConfigError("classes", f"at least 2 classes are needed, got {len(classes)}")


class CosineClassifier(nn.Module):
    def __init__(self, dim: int, n_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.1)
        self.scale = scale

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))


def _projection(in_features: int, emb_dim: int) -> nn.Sequential:
    """Features -> 4 * emb_dim (BN, ReLU) -> emb_dim, the head both families share."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(in_features, 4 * emb_dim),
        nn.BatchNorm1d(4 * emb_dim),
        nn.ReLU(inplace=True),
        nn.Linear(4 * emb_dim, emb_dim),
    )


class EmbeddingNet(nn.Module):
    """`features` (the family's trunk, (B, 1, 28, 28) -> (B, n_features)) -> `proj` -> L2-normalised
    embedding; `logits` is the cosine classifier on it."""

    def __init__(self, features: nn.Module, n_features: int, cfg: EncoderConfig) -> None:
        super().__init__()
        self.features = features
        self.proj = _projection(n_features, cfg.emb_dim)
        self.classifier = CosineClassifier(cfg.emb_dim, cfg.n_classes, cfg.scale)
        self.emb_dim = cfg.emb_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) float in [0, 1] -> (B, emb_dim) L2-normalised."""
        return F.normalize(self.proj(self.features(x)), dim=1)

    @torch.jit.export
    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return self.classifier(emb)


class CNNEncoder(EmbeddingNet):
    def __init__(self, cfg: EncoderConfig) -> None:
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
        super().__init__(nn.Sequential(*layers), c_in * size * size, cfg)


class MixerBlock(nn.Module):
    """MLP-Mixer block on (B, tokens, dim): token mixing across patches, then channel mixing."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MixerTrunk(nn.Module):
    """(B, 1, 28, 28) -> 4x4 patches (49 tokens of `width` channels) -> `depth` Mixer blocks -> (B, width)."""

    PATCH = 4

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        tokens = (28 // self.PATCH) ** 2
        self.patchify = nn.Conv2d(1, width, self.PATCH, stride=self.PATCH)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patchify(x).flatten(2).transpose(1, 2)  # (B, tokens, width)
        return self.norm(self.blocks(t)).mean(1)


class MixerEncoder(EmbeddingNet):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(MixerTrunk(cfg.width, cfg.depth), cfg.width, cfg)


ARCHS: dict[str, Callable[[EncoderConfig], EmbeddingNet]] = {"cnn": CNNEncoder, "mixer": MixerEncoder}


def build_encoder(cfg: EncoderConfig) -> EmbeddingNet:
    if cfg.arch not in ARCHS:
        raise ConfigError("arch", f"{cfg.arch!r} is not one of {', '.join(ARCHS)}")
    return ARCHS[cfg.arch](cfg)


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
) -> tuple[EmbeddingNet, dict[str, Any]]:
    """Train with cross-entropy through the cosine classifier (normalised-softmax embeddings)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_encoder(cfg)
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
def accuracy(model: EmbeddingNet, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    emb = torch.from_numpy(embed(model, images))
    return float((model.logits(emb).argmax(1).numpy() == labels).mean())
