"""A compat pack trained on a sample of the live gallery: pairs of (stored old vector, new vector), labels
optional. This is how any model pair gets its psi, h, sigma and calibration without a labelled training set.

- Split the sample (seeded) into a fit part and a held-out probe part (`probe_share`).
- Relevance: the items' labels when every sampled item has one; otherwise pseudo-labels, the k-means
  clusters of the *new* model's vectors fitted on the fit part (the new model's neighbourhood structure;
  its instance pairs drive the alignment terms). The probe part gets the nearest fitted centroid.
- psi, h and sigma train with the same losses as the offline packs (models/compat.py) on those labels,
  without the new model's classifier (an operator's encoder need not have one; `w_cls = 0`), for at least
  `min_steps` optimiser steps each whatever the sample size.
- Calibrations for reverse, forward and two-pass, and the predictions of every path x order, on the probe part.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn

from models import compat as C
from models import evaluate as E
from models.paths import ModulePack, predict


@dataclass
class GalleryFitConfig:
    probe_share: float = 0.2
    min_steps: int = 600
    clusters: int = 0  # 0: about one per 40 fit items, between 8 and 64
    seed: int = 0
    compat: C.CompatConfig = field(default_factory=lambda: C.CompatConfig(batch_size=256, w_cls=0.0))


@dataclass
class FittedPack:
    psi: nn.Module
    h: nn.Module
    sigma: nn.Module
    calibration: dict[str, Any]
    predictions: dict[str, Any]
    metrics: dict[str, Any]
    config: dict[str, Any]


def pseudo_labels(fit: np.ndarray, probe: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means on the fit part's new-model vectors; every vector gets its nearest centroid."""
    import faiss

    km = faiss.Kmeans(fit.shape[1], k, niter=25, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(fit, dtype=np.float32))
    _, y_fit = km.index.search(np.ascontiguousarray(fit, dtype=np.float32), 1)
    _, y_probe = km.index.search(np.ascontiguousarray(probe, dtype=np.float32), 1)
    return y_fit.reshape(-1).astype(np.int64), y_probe.reshape(-1).astype(np.int64)


def _epochs(n: int, batch_size: int, min_steps: int) -> int:
    return max(1, math.ceil(min_steps / max(n // batch_size, 1)))


def fit_on_sample(
    old: np.ndarray, new: np.ndarray, labels: np.ndarray | None, cfg: GalleryFitConfig | None = None
) -> FittedPack:
    """Train a compat pack on paired vectors of one gallery sample (`labels` None or with -1 = unlabelled)."""
    cfg = cfg or GalleryFitConfig()
    n = len(old)
    if n < 20:
        raise ValueError(f"a sample of {n} items is too small to train a compat pack (at least 20)")
    t0 = time.monotonic()
    perm = np.random.default_rng(cfg.seed).permutation(n)
    n_probe = min(max(round(cfg.probe_share * n), 10), n - 10)
    probe, fit = perm[:n_probe], perm[n_probe:]
    labelled = labels is not None and bool(np.all(np.asarray(labels) >= 0))
    if labelled:
        assert labels is not None
        y_fit, y_probe = np.asarray(labels)[fit], np.asarray(labels)[probe]
        relevance = "labels"
    else:
        k = cfg.clusters or int(np.clip(len(fit) // 40, 8, 64))
        y_fit, y_probe = pseudo_labels(new[fit], new[probe], k, cfg.seed)
        relevance = f"pseudo-labels: {k} k-means clusters of the new model's vectors"
    cc = cfg.compat
    bs = min(cc.batch_size, len(fit))
    cc = replace(
        cc,
        batch_size=bs,
        epochs_psi=_epochs(len(fit), bs, cfg.min_steps),
        epochs_h=_epochs(len(fit), bs, cfg.min_steps),
        sigma_warmup=max(1, _epochs(len(fit), bs, cfg.min_steps) // 6),
        seed=cfg.seed,
    )
    psi, psi_info = C.train_psi(new[fit], old[fit], y_fit, cc, progress=False)
    no_classifier = nn.Linear(new.shape[1], int(y_fit.max()) + 1)  # weighted 0 (w_cls): sized to fit the labels
    h, sigma, h_info = C.train_h_sigma(old[fit], new[fit], y_fit, no_classifier, replace(cc, w_cls=0.0), progress=False)
    fit_s = time.monotonic() - t0
    calibration, calib_metrics = {}, {}
    for mode in E.MODES:
        calibration[mode], calib_metrics[mode] = C.select_calibration(
            mode, old[probe], new[probe], y_probe, psi, h, sigma, cc.calib_knots, seed=cfg.seed
        )
    pack = ModulePack(psi, h, sigma, calibration)
    probe_desc = {"source": "gallery sample (held out)", "relevance": relevance}
    predictions = predict(old[probe], new[probe], y_probe, pack, probe=probe_desc, k=min(100, n_probe - 1))
    metrics = {
        "sample": n,
        "fit_items": len(fit),
        "probe_items": n_probe,
        "relevance": relevance,
        "psi": psi_info,
        "h_sigma": h_info,
        "calibration": calib_metrics,
        "train_seconds": round(fit_s, 1),
        "seconds": round(time.monotonic() - t0, 1),
    }
    config = {"compat": cc.to_dict(), "probe_share": cfg.probe_share, "min_steps": cfg.min_steps, "seed": cfg.seed}
    return FittedPack(psi, h, sigma, calibration, predictions, metrics, config)
