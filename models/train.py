"""Training pipelines for the shipped artifacts: v1 (old), v2 (new) and compat-v1-v2.

The Fashion-MNIST training split is divided once: the first 55,000 images train the encoders and the
compat transformations, the last 5,000 (still training data, never the test split) fit the calibration.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import compat as C
from models.artifacts import load_encoder, save_compat, save_encoder
from models.data import fingerprint, load
from models.encoders import EncoderConfig, accuracy, train_encoder

INPUT_SPEC = {"shape": [1, 28, 28], "dtype": "float32", "range": [0.0, 1.0], "preprocess": "models.preprocess"}
CALIB_SPLIT = 5000


@dataclass
class Recipe:
    """Everything `train all` does; `quick()` is the seconds-long variant the tests use."""

    dataset: str = "fashion-mnist"
    old_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    calib_size: int = CALIB_SPLIT
    v1: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(width=16, depth=2, emb_dim=32, n_classes=5, epochs=4, seed=1)
    )
    v2: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(width=16, depth=3, emb_dim=64, n_classes=10, epochs=5, seed=2)
    )
    compat: C.CompatConfig = field(default_factory=C.CompatConfig)

    @classmethod
    def quick(cls) -> Recipe:
        return cls(
            dataset="digits",
            calib_size=300,
            v1=EncoderConfig(width=4, depth=1, emb_dim=8, n_classes=5, epochs=2, batch_size=64, seed=1),
            v2=EncoderConfig(width=6, depth=1, emb_dim=12, n_classes=10, epochs=2, batch_size=64, seed=2),
            compat=C.CompatConfig(hidden=32, epochs_psi=3, epochs_h=3, batch_size=128, sigma_warmup=1, calib_knots=16),
        )


def set_threads(n: int = 2) -> None:
    torch.set_num_threads(n)


def _split(recipe: Recipe, data_dir: Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y = load(recipe.dataset, "train", data_dir)
    c = recipe.calib_size
    return {"fit": (x[:-c], y[:-c]), "calib": (x[-c:], y[-c:])}


def train_encoders(
    out: Path,
    recipe: Recipe | None = None,
    data_dir: Path | None = None,
    which: tuple[str, ...] = ("v1", "v2"),
    progress: bool = True,
) -> dict[str, Path]:
    recipe = recipe or Recipe()
    parts = _split(recipe, data_dir)
    x_fit, y_fit = parts["fit"]
    x_cal, y_cal = parts["calib"]
    written = {}
    for name in which:
        cfg = getattr(recipe, name)
        if name == "v1":
            keep = np.isin(y_fit, recipe.old_classes)
            x, y = x_fit[keep], y_fit[keep]
            # labels 0..len(old_classes)-1 in the order of old_classes
            remap = {c: i for i, c in enumerate(recipe.old_classes)}
            y = np.array([remap[int(v)] for v in y], dtype=np.int64)
            cal_keep = np.isin(y_cal, recipe.old_classes)
            xc, yc = x_cal[cal_keep], np.array([remap[int(v)] for v in y_cal[cal_keep]], dtype=np.int64)
            classes = list(recipe.old_classes)
        else:
            x, y, xc, yc = x_fit, y_fit, x_cal, y_cal
            classes = sorted(int(v) for v in np.unique(y_fit))
        model, info = train_encoder(x, y, cfg, progress=progress, desc=f"train {name}")
        metrics = {**info, "heldout_accuracy": accuracy(model, xc, yc)}
        manifest = {
            "name": name,
            "dim": cfg.emb_dim,
            "input": INPUT_SPEC,
            "config": {**cfg.to_dict(), "arch": "CNNEncoder", "classes": classes},
            "data": {"dataset": recipe.dataset, "split": "train", "rows": f"[0, {len(x_fit)})", "n": len(x)},
            "data_fingerprint": fingerprint(x, y),
            "metrics": metrics,
        }
        written[name] = save_encoder(model, out / name, manifest)
    return written


class _Logits(nn.Module):
    """v2's frozen classifier as a module (for h's classification loss)."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.encoder.logits(emb)


def train_compat_pack(
    out: Path,
    recipe: Recipe | None = None,
    data_dir: Path | None = None,
    old: str = "v1",
    new: str = "v2",
    progress: bool = True,
) -> Path:
    recipe = recipe or Recipe()
    cfg = recipe.compat
    parts = _split(recipe, data_dir)
    x_fit, y_fit = parts["fit"]
    x_cal, y_cal = parts["calib"]
    enc_old, enc_new = load_encoder(out / old), load_encoder(out / new)
    t0 = time.monotonic()
    o_fit, n_fit = enc_old.embed(x_fit), enc_new.embed(x_fit)
    o_cal, n_cal = enc_old.embed(x_cal), enc_new.embed(x_cal)
    embed_s = time.monotonic() - t0
    psi, psi_info = C.train_psi(n_fit, o_fit, y_fit, cfg, progress=progress)
    extra = None
    if cfg.w_psi_in_sigma > 0:
        extra = cfg.w_psi_in_sigma * ((C.apply(psi, n_fit) - o_fit) ** 2).sum(1)
    h, sigma, h_info = C.train_h_sigma(
        o_fit, n_fit, y_fit, _Logits(enc_new.module), cfg, progress=progress, extra_item_loss=extra
    )
    calibration, calib_metrics = {}, {}
    for mode in ("reverse", "forward"):
        calibration[mode], calib_metrics[mode] = C.select_calibration(
            mode, o_cal, n_cal, y_cal, psi, h, sigma, cfg.calib_knots, seed=cfg.seed
        )
    manifest = {
        "from": old,
        "to": new,
        "from_dim": enc_old.dim,
        "to_dim": enc_new.dim,
        "name": f"compat-{old}-{new}",
        "input": {
            "psi": f"(B, {enc_new.dim}) {new} vectors",
            "h": f"(B, {enc_old.dim}) {old} vectors",
            "sigma": f"(B, {enc_old.dim}) {old} vectors -> (B,) log-variance",
        },
        "config": cfg.to_dict(),
        "calibration": calibration,
        "data": {"dataset": recipe.dataset, "split": "train", "fit_rows": len(x_fit), "calibration_rows": len(x_cal)},
        "data_fingerprint": fingerprint(x_fit, y_fit, x_cal, y_cal),
        "encoders": {old: enc_old.manifest.get("checksum"), new: enc_new.manifest.get("checksum")},
        "metrics": {
            "psi": psi_info,
            "h_sigma": h_info,
            "calibration": calib_metrics,
            "embed_seconds": round(embed_s, 1),
        },
    }
    return save_compat(psi, h, sigma, out / f"compat-{old}-{new}", manifest)


def train_all(
    out: Path, recipe: Recipe | None = None, data_dir: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    set_threads()
    recipe = recipe or Recipe()
    t0 = time.monotonic()
    paths = train_encoders(out, recipe, data_dir, progress=progress)
    t1 = time.monotonic()
    paths["compat"] = train_compat_pack(out, recipe, data_dir, progress=progress)
    t2 = time.monotonic()
    return {
        "paths": paths,
        "encoder_seconds": t1 - t0,
        "compat_seconds": t2 - t1,
        "seconds": t2 - t0,
        "recipe": asdict(recipe),
    }
