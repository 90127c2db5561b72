"""The learned backfill order: a net that predicts an item's merge benefit from its stored old vector.

What the merged ranking gains from backfilling an item is its *merge benefit* (models/benefit.py): the
change in total AP@k when it alone moves from OLD to NEW. FastFill's sigma predicts something else, the
forward error ||h(v1) - v2||, which on the shipped pair correlates 0.14 with the benefit and orders no
better than random. The order net is trained to predict the benefit's rank directly:

1. targets: on labelled training rows (never the probe set the predictions are measured on), split into
   galleries of `chunk` items, each item's merge benefit within its gallery (forward-path distances, the
   pack's forward calibration: the distances of the forward path and of the re-scored reverse path),
   rank-normalised to [0, 1] per gallery so galleries of any density weigh the same, and averaged over
   `states` backfill states (fractions 0, 1/states, ..., each a seeded random subset already in NEW; an
   item counts only in the states where it is still in OLD). A curve's AUC sums what each move is worth
   when it is made, and what an item adds to the merged ranking changes as its neighbours move: at fraction
   0 alone the targets miss that;
2. a nearest-neighbour regressor over those rows' old vectors (`OrderScore`).

Measured on the shipped pair's calibration split (5,000 training images; the order fitted on the 20,000
fit rows before it; relative gain minus the mean of 8 random orders): one state (fraction 0) +0.019
forward, +0.024 reverse; four states +0.030 forward, +0.031 reverse (8 states, or 40,000 rows, did not
do better). The commands and the test-split figures: issue 16's closing note and docs/results/.

At planning time the worker scores each item's stored old vector (no new-model pass, no labels) and
backfills in descending score: the `uncertainty` policy where the pack carries an order net
(`CompatPack.uncertainty`). Whether it beats random orders on a pair is measured on the probe set
(models/paths.py), and the rollout falls back to random where it does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models.benefit import merge_benefit


class OrderScore(nn.Module):
    """Old vector (B, old_dim) -> (B,) predicted merge-benefit rank: the mean target of its `k` nearest
    reference rows (old vectors of labelled training items). Higher = backfill earlier.

    A nearest-neighbour regressor, not a trained MLP: on the shipped pair (5,000 test images, forward path)
    it ordered at a relative gain of 0.969 against 0.951 for random orders (three seeds), where an MLP
    fitted to the same targets reached 0.955-0.963 (one-off experiments of
    issue 16, not kept as a script; its closing note has them)."""

    def __init__(self, refs: torch.Tensor, targets: torch.Tensor, k: int = 10, batch: int = 4096) -> None:
        super().__init__()
        self.register_buffer("refs", refs.float())
        self.register_buffer("targets", targets.float())
        self.k = min(int(k), int(refs.shape[0]))
        self.batch = int(batch)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in v.float().split(self.batch):
            d = torch.cdist(chunk, self.refs)  # type: ignore[arg-type]
            idx = d.topk(self.k, dim=1, largest=False).indices
            out.append(self.targets[idx].mean(1))  # type: ignore[index]
        if len(out) == 0:
            return torch.zeros(0)
        return torch.cat(out)


@dataclass
class OrderConfig:
    rows: int = 20000  # training rows whose merge benefit is computed (the last ones before the probe set)
    chunk: int = 5000  # gallery size the benefit is measured in
    k: int = 10  # neighbours averaged per scored item
    states: int = 4  # backfill states the benefit is averaged over (fractions 0, 1/states, ...)
    seed: int = 0


def benefit_targets(
    old: np.ndarray,
    new: np.ndarray,
    labels: np.ndarray,
    forward: Callable[[np.ndarray], np.ndarray],
    calibrate: Callable[[np.ndarray], np.ndarray],
    chunk: int,
    states: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Per row its merge benefit within its gallery of `chunk` consecutive rows, rank-normalised per gallery
    and state, averaged over `states` backfill states (state i: a seeded random i/states of the gallery
    already in NEW; a row counts where it is still in OLD, so state 0 always counts)."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels))
    for a in range(0, len(labels), chunk):
        b = min(a + chunk, len(labels))
        if b - a < 2:
            out[a:b] = 0.5
            continue
        h_old = forward(old[a:b])
        ranks = []
        for i in range(max(1, states)):
            in_new = np.zeros(b - a, bool)
            in_new[rng.permutation(b - a)[: (b - a) * i // max(1, states)]] = True
            ben = merge_benefit(new[a:b], h_old, labels[a:b], calibrate, in_new=in_new)
            rank = np.full(b - a, np.nan)
            rank[~in_new] = np.argsort(np.argsort(ben[~in_new], kind="stable"), kind="stable")
            ranks.append(rank / max(int((~in_new).sum()) - 1, 1))
        out[a:b] = np.nanmean(np.stack(ranks), 0)
    return out


def fit_order(
    old: np.ndarray,
    new: np.ndarray,
    labels: np.ndarray,
    forward: Callable[[np.ndarray], np.ndarray],
    calibrate: Callable[[np.ndarray], np.ndarray],
    cfg: OrderConfig | None = None,
) -> tuple[OrderScore, dict[str, Any]]:
    """Targets on the last `cfg.rows` rows of (old, new, labels), and the scorer over them, with its metrics."""
    cfg = cfg or OrderConfig()
    rows = slice(max(0, len(labels) - cfg.rows), len(labels))
    t0 = time.monotonic()
    targets = benefit_targets(
        old[rows], new[rows], np.asarray(labels)[rows], forward, calibrate, cfg.chunk, cfg.states, cfg.seed
    )
    net = OrderScore(torch.from_numpy(np.ascontiguousarray(old[rows])), torch.from_numpy(targets), cfg.k)
    info = {"rows": len(targets), "target_seconds": round(time.monotonic() - t0, 1), "config": asdict(cfg)}
    return net, info
