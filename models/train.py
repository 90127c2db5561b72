"""Training pipelines: the shipped artifacts v1 (old), v2 (new) and compat-v1-v2, and any other encoder
(`encoder_config`: v2's recipe, or v1's / v2's, with overrides) and compat pack between two of them.

The Fashion-MNIST training split is divided once: the first 55,000 images train the encoders and the
compat transformations, the last 5,000 (still training data, never the test split) fit the calibration.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import compat as C
from models import evaluate as E
from models.artifacts import ArtifactError, Encoder, load_encoder, save_compat, save_encoder
from models.data import fingerprint, load
from models.encoders import ARCH_DEFAULTS, ConfigError, EncoderConfig, accuracy, train_encoder
from models.paths import ModulePack, predict
from models.preprocess import GRAY28

CALIB_SPLIT = 5000
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
OLD_CLASSES = (0, 1, 2, 3, 4)


@dataclass
class Recipe:
    """Everything `train all` does; `quick()` is the seconds-long variant the tests use."""

    dataset: str = "fashion-mnist"
    calib_size: int = CALIB_SPLIT
    v1: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(
            width=16, depth=2, emb_dim=32, n_classes=5, epochs=4, seed=1, classes=OLD_CLASSES
        )
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
            v1=EncoderConfig(
                width=4, depth=1, emb_dim=8, n_classes=5, epochs=2, batch_size=64, seed=1, classes=OLD_CLASSES
            ),
            v2=EncoderConfig(width=6, depth=1, emb_dim=12, n_classes=10, epochs=2, batch_size=64, seed=2),
            compat=C.CompatConfig(
                hidden=32,
                epochs_psi=3,
                epochs_h=3,
                batch_size=128,
                sigma_warmup=1,
                calib_knots=16,
                order_rows=600,
                order_chunk=300,
            ),
        )


def set_threads(n: int = 2) -> None:
    torch.set_num_threads(n)


def _split(recipe: Recipe, data_dir: Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y = load(recipe.dataset, "train", data_dir)
    c = recipe.calib_size
    return {"fit": (x[:-c], y[:-c]), "calib": (x[-c:], y[-c:])}


def encoder_config(name: str, recipe: Recipe | None = None, overrides: dict[str, Any] | None = None) -> EncoderConfig:
    """The recipe of encoder `name`: v1's or v2's for those names, v2's on all classes for any other, with
    `overrides` (EncoderConfig fields) applied. Switching `arch` without giving `width` / `depth` takes the
    new arch's `ARCH_DEFAULTS`. Raises `ConfigError` naming the first invalid field."""
    if not NAME_RE.fullmatch(name) or name.startswith("compat-"):
        raise ConfigError("name", f"{name!r}: letters, digits, '_', '.', '-' (at most 64), not compat-*")
    recipe = recipe or Recipe()
    base = getattr(recipe, name) if name in ("v1", "v2") else replace(recipe.v2, classes=None)
    over = dict(overrides or {})
    unknown = set(over) - set(EncoderConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "not an EncoderConfig field")
    arch = over.get("arch", base.arch)
    if arch != base.arch and arch in ARCH_DEFAULTS:
        over = {**ARCH_DEFAULTS[arch], **over}
    if over.get("classes") is not None:
        over["classes"] = tuple(int(c) for c in over["classes"])
        over["n_classes"] = len(over["classes"])
    cfg = replace(base, **over)
    cfg.validate()
    return cfg


def _select(x: np.ndarray, y: np.ndarray, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The rows whose label is in `classes`, labels renumbered 0..len(classes)-1 in the order of `classes`."""
    keep = np.isin(y, classes)
    lut = np.full(max(int(y.max(initial=0)), *classes) + 1, -1, dtype=np.int64)
    lut[classes] = np.arange(len(classes))
    return x[keep], lut[y[keep]]


def train_one_encoder(
    out: Path,
    name: str,
    cfg: EncoderConfig,
    recipe: Recipe,
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    progress: bool = True,
) -> Path:
    """Train `cfg` on the `fit` part (its classes only), score it on `calib`, write <out>/<name>/."""
    x_fit, y_fit = parts["fit"]
    x_cal, y_cal = parts["calib"]
    present = sorted(int(v) for v in np.unique(y_fit))
    classes = list(cfg.classes) if cfg.classes is not None else present
    missing = sorted(set(classes) - set(present))
    if missing:
        raise ConfigError("classes", f"{missing} do not occur in {recipe.dataset}'s training data")
    cfg = replace(cfg, classes=tuple(classes), n_classes=len(classes))
    cfg.validate()
    (x, y), (xc, yc) = _select(x_fit, y_fit, classes), _select(x_cal, y_cal, classes)
    model, info = train_encoder(x, y, cfg, progress=progress, desc=f"train {name}")
    metrics = {**info, "heldout_accuracy": accuracy(model, xc, yc), "heldout_n": len(yc)}
    manifest = {
        "name": name,
        "dim": cfg.emb_dim,
        "input": GRAY28.to_manifest(),
        # the full recipe: EncoderConfig(**{k: v for k, v in config.items() if k != "module"})
        "config": {**cfg.to_dict(), "classes": classes, "module": type(model).__name__},
        "data": {"dataset": recipe.dataset, "split": "train", "rows": f"[0, {len(x_fit)})", "n": len(x)},
        "data_fingerprint": fingerprint(x, y),
        "metrics": metrics,
    }
    return save_encoder(model, out / name, manifest)


def train_encoders(
    out: Path,
    recipe: Recipe | None = None,
    data_dir: Path | None = None,
    which: tuple[str, ...] = ("v1", "v2"),
    progress: bool = True,
    configs: dict[str, EncoderConfig] | None = None,
) -> dict[str, Path]:
    """Train the encoders named in `which`, each with `configs[name]` or else `encoder_config(name, recipe)`."""
    recipe = recipe or Recipe()
    configs = configs or {}
    cfgs = {name: configs.get(name) or encoder_config(name, recipe) for name in which}
    parts = _split(recipe, data_dir)
    return {name: train_one_encoder(out, name, cfg, recipe, parts, progress) for name, cfg in cfgs.items()}


class _Logits(nn.Module):
    """v2's frozen classifier as a module (for h's classification loss)."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.encoder.logits(emb)


def head_labels(encoder: Encoder, labels: np.ndarray) -> np.ndarray:
    """Dataset labels -> indices of `encoder`'s classifier head (its manifest's `config.classes`, in order);
    labels outside them become -100, which the cross-entropy of h's loss ignores."""
    classes = (encoder.manifest.get("config") or {}).get("classes")
    if classes is None:  # an encoder written without it: the head is indexed by dataset label
        return labels
    lut = np.full(max(int(labels.max(initial=0)), *classes) + 1, -100, dtype=np.int64)
    lut[list(classes)] = np.arange(len(classes))
    return lut[labels]


def check_dataset(recipe: Recipe, *encoders: Encoder) -> None:
    """Refuse a compat pack whose encoders were trained on another dataset than `recipe` (e.g. --quick)."""
    for enc in encoders:
        trained_on = (enc.manifest.get("data") or {}).get("dataset")
        if trained_on is not None and trained_on != recipe.dataset:
            raise ArtifactError(
                f"encoder {enc.name!r} was trained on {trained_on}, the compat recipe uses {recipe.dataset}"
            )


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
    check_dataset(recipe, enc_old, enc_new)
    t0 = time.monotonic()
    o_fit, n_fit = enc_old.embed(x_fit), enc_new.embed(x_fit)
    o_cal, n_cal = enc_old.embed(x_cal), enc_new.embed(x_cal)
    embed_s = time.monotonic() - t0
    psi, psi_info = C.train_psi(n_fit, o_fit, y_fit, cfg, progress=progress)
    extra = None
    if cfg.w_psi_in_sigma > 0:
        extra = cfg.w_psi_in_sigma * ((C.apply(psi, n_fit) - o_fit) ** 2).sum(1)
    h, sigma, h_info = C.train_h_sigma(
        o_fit,
        n_fit,
        head_labels(enc_new, y_fit),
        _Logits(enc_new.module),
        cfg,
        progress=progress,
        extra_item_loss=extra,
    )
    calibration, calib_metrics = {}, {}
    for mode in E.MODES:
        calibration[mode], calib_metrics[mode] = C.select_calibration(
            mode, o_cal, n_cal, y_cal, psi, h, sigma, cfg.calib_knots, seed=cfg.seed
        )
    order, order_info = fit_pack_order(o_fit, n_fit, y_fit, h, calibration, cfg)
    probe = {"dataset": recipe.dataset, "split": "train", "rows": f"last {len(x_cal)} (the calibration split)"}
    predictions = predict(o_cal, n_cal, y_cal, ModulePack(psi, h, sigma, calibration, order), probe=probe)
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
        "order": order_info,
        "predictions": predictions,
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
    return save_compat(psi, h, sigma, out / f"compat-{old}-{new}", manifest, order)


def fit_pack_order(
    old: np.ndarray, new: np.ndarray, labels: np.ndarray, h: Any, calibration: dict[str, Any], cfg: C.CompatConfig
) -> tuple[Any, dict[str, Any] | None]:
    """The order net (models/order.py) over the last `cfg.order_rows` of these training rows, with h and
    the forward calibration; (None, None) when `order_rows` is 0."""
    from models.artifacts import apply_calibration
    from models.order import OrderConfig, fit_order

    if cfg.order_rows <= 0:
        return None, None
    ocfg = OrderConfig(
        rows=cfg.order_rows, chunk=cfg.order_chunk, k=cfg.order_k, states=cfg.order_states, seed=cfg.seed
    )
    return fit_order(
        old, new, labels, lambda v: C.apply(h, v), lambda d: apply_calibration(calibration.get("forward"), d), ocfg
    )


def add_order(
    out: Path, recipe: Recipe | None = None, data_dir: Path | None = None, old: str = "v1", new: str = "v2"
) -> dict[str, Any]:
    """Fit the order net of an existing pack <out>/compat-<old>-<new> on the recipe's fit rows (the last
    `order_rows` before the calibration split), write it, and re-predict every path on the calibration split.
    Returns the new predictions."""
    from models.artifacts import load_compat, save_order
    from models.paths import annotate_pack

    recipe = recipe or Recipe()
    cfg = recipe.compat
    parts = _split(recipe, data_dir)
    x_fit, y_fit = parts["fit"]
    x_cal, y_cal = parts["calib"]
    rows = slice(max(0, len(y_fit) - cfg.order_rows), len(y_fit))
    pack_dir = out / f"compat-{old}-{new}"
    pack = load_compat(pack_dir)
    enc_old, enc_new = load_encoder(out / old), load_encoder(out / new)
    check_dataset(recipe, enc_old, enc_new)
    o, n = enc_old.embed(x_fit[rows]), enc_new.embed(x_fit[rows])
    order, info = fit_pack_order(o, n, y_fit[rows], pack.h, pack.manifest.get("calibration") or {}, cfg)
    if order is None:
        raise ArtifactError("order_rows is 0: no order net to fit")
    save_order(order, pack_dir, info or {})
    probe = {"dataset": recipe.dataset, "split": "train", "rows": f"last {len(x_cal)} (the calibration split)"}
    return annotate_pack(pack_dir, out / old, out / new, x_cal, y_cal, probe)


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
