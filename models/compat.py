"""Compatibility transformations between an old model (v1) and a new one (v2), trained on frozen features.

- psi (reverse, new -> old space): alignment loss ||psi(n_i) - o_i||^2, a metric-compatible cross-model
  contrastive loss whose candidate set holds the OLD gallery seen through psi (d(psi(n_q), o_j)) *and* the
  NEW gallery (d(n_q, n_j), constant), so OLD and NEW distances land on one scale, and a ranking loss
  (KL between the new-space neighbour distribution of q and the cross-model one) so cross-model distances
  rank like new-space distances.
- h (forward, old -> new space) and sigma (uncertainty head on the old vector), FastFill's loss
  0.5 * exp(-s_i) * L_i + 0.5 * s_i with L_i = ||h(o_i) - n_i||^2 + CE(v2_classifier(h(o_i)), y_i) and
  s_i = sigma(o_i) the predicted log-variance.
- calibration: a monotone piecewise-linear map from OLD-side distances onto the NEW side's scale, per mode,
  fitted on training data (a held-out part of the training split) by matching P(relevant | distance).

All vectors are L2-normalised; distances are squared L2 (faiss.IndexFlatL2).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


@dataclass
class CompatConfig:
    hidden: int = 256
    epochs_psi: int = 12
    epochs_h: int = 12
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1  # contrastive / ranking temperature on squared-L2 distances
    w_align: float = 1.0
    w_contrast: float = 1.0
    w_rank: float = 1.0
    w_cls: float = 0.5  # classification loss weight inside FastFill's L_i
    sigma_warmup: int = 2  # epochs of h training before the uncertainty term is switched on
    w_psi_in_sigma: float = 0.0  # adds psi's per-item alignment error (frozen psi) to L_i when > 0
    calib_knots: int = 64
    # the order net (models/order.py): merge benefits of the last `order_rows` fit rows, in galleries of
    # `order_chunk` and averaged over `order_states` backfill states, each scored item averaging its `order_k`
    # nearest; 0 rows = no order net (sigma orders)
    order_rows: int = 20000
    order_chunk: int = 5000
    order_k: int = 10
    order_states: int = 4
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MLP(nn.Module):
    """in_dim -> hidden -> hidden -> out_dim; L2-normalised output unless `normalize` is False."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, normalize: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
        )
        self.normalize = normalize

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        out = self.net(v)
        if self.normalize:
            out = F.normalize(out, dim=1)
        return out


class Transform(nn.Module):
    """A residual-free MLP map between spaces, L2-normalised: psi (new -> old) or h (old -> new)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, out_dim, hidden, normalize=True)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.mlp(v)


class Sigma(nn.Module):
    """Old vector (B, old_dim) -> (B,) predicted log-variance; higher = worse represented = backfill first."""

    def __init__(self, in_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net(v).squeeze(-1)


def sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared L2 between rows of a (n, d) and b (m, d)."""
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min(0.0)


def psi_losses(
    psi: nn.Module, n: torch.Tensor, o: torch.Tensor, y: torch.Tensor, temperature: float
) -> dict[str, torch.Tensor]:
    """The three psi losses for one batch of paired (new, old) features with labels."""
    q = psi(n)
    align = (q - o).pow(2).sum(1).mean()
    b = n.shape[0]
    eye = torch.eye(b, dtype=torch.bool)
    d_cross = sqdist(q, o)  # query psi(n_i) against OLD gallery o_j (j = i included: the item itself)
    d_new = sqdist(n, n)  # query n_i against NEW gallery n_j (constant; j = i excluded)
    logits = torch.cat([-d_cross, (-d_new).masked_fill(eye, float("-inf"))], 1) / temperature
    same = y[:, None] == y[None, :]
    pos = torch.cat([same, same & ~eye], 1)
    logp = logits.log_softmax(1)
    contrast = -(logp.masked_fill(~pos, 0.0).sum(1) / pos.sum(1).clamp_min(1)).mean()
    # ranking: the cross-model neighbour distribution of q should match the new-space one
    target = (-d_new / temperature).masked_fill(eye, float("-inf")).softmax(1)
    pred = (-d_cross / temperature).masked_fill(eye, -1e4).log_softmax(1)  # finite: 0 * (-inf) is nan
    rank = F.kl_div(pred, target, reduction="batchmean")
    return {"align": align, "contrast": contrast, "rank": rank}


def fastfill_item_loss(
    h: nn.Module, classifier: nn.Module, o: torch.Tensor, n: torch.Tensor, y: torch.Tensor, w_cls: float
) -> torch.Tensor:
    """L_i = ||h(o_i) - n_i||^2 + w_cls * CE(v2_classifier(h(o_i)), y_i), per item."""
    t = h(o)
    return (t - n).pow(2).sum(1) + w_cls * F.cross_entropy(classifier(t), y, reduction="none")


def fastfill_loss(item_loss: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """FastFill: mean of 0.5 * exp(-s_i) * L_i + 0.5 * s_i (s = predicted log-variance)."""
    return (0.5 * torch.exp(-s) * item_loss + 0.5 * s).mean()


def _batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
        yield perm[i : i + batch_size]


def train_psi(
    new_feats: np.ndarray, old_feats: np.ndarray, labels: np.ndarray, cfg: CompatConfig, progress: bool = True
) -> tuple[Transform, dict[str, Any]]:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_t, o_t, y_t = (torch.from_numpy(np.asarray(a)) for a in (new_feats, old_feats, labels.astype(np.int64)))
    psi = Transform(n_t.shape[1], o_t.shape[1], cfg.hidden)
    opt = torch.optim.AdamW(psi.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs_psi * max(len(n_t) // cfg.batch_size, 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    hist: dict[str, list[float]] = {"align": [], "contrast": [], "rank": [], "total": []}
    t0 = time.monotonic()
    bar = tqdm(total=steps, desc="psi", unit="step", disable=not progress, leave=False)
    done = 0
    for _ in range(cfg.epochs_psi):
        psi.train()
        acc = dict.fromkeys(hist, 0.0)
        cnt = 0
        for idx in _batches(len(n_t), cfg.batch_size, gen):
            if done >= steps:
                break
            parts = psi_losses(psi, n_t[idx], o_t[idx], y_t[idx], cfg.temperature)
            loss = cfg.w_align * parts["align"] + cfg.w_contrast * parts["contrast"] + cfg.w_rank * parts["rank"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            for k, v in parts.items():
                acc[k] += float(v.detach())
            acc["total"] += float(loss.detach())
            cnt += 1
            bar.update(1)
        for k in hist:
            hist[k].append(acc[k] / max(cnt, 1))
        bar.set_postfix(loss=f"{hist['total'][-1]:.3f}")
    bar.close()
    psi.eval()
    return psi, {"loss_per_epoch": hist, "train_seconds": round(time.monotonic() - t0, 1)}


def train_h_sigma(
    old_feats: np.ndarray,
    new_feats: np.ndarray,
    labels: np.ndarray,
    classifier: nn.Module,
    cfg: CompatConfig,
    progress: bool = True,
    extra_item_loss: np.ndarray | None = None,
) -> tuple[Transform, Sigma, dict[str, Any]]:
    """Train h and sigma jointly with FastFill's loss (v2's classifier frozen). `extra_item_loss` (N,) is a
    per-item constant added to L_i (psi's alignment error), so sigma also reflects the reverse direction."""
    torch.manual_seed(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    o_t, n_t, y_t = (torch.from_numpy(np.asarray(a)) for a in (old_feats, new_feats, labels.astype(np.int64)))
    extra = (
        torch.zeros(len(o_t)) if extra_item_loss is None else torch.from_numpy(np.asarray(extra_item_loss, np.float32))
    )
    for p in classifier.parameters():
        p.requires_grad_(False)
    classifier.eval()
    h = Transform(o_t.shape[1], n_t.shape[1], cfg.hidden)
    sigma = Sigma(o_t.shape[1])
    opt = torch.optim.AdamW(list(h.parameters()) + list(sigma.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs_h * max(len(o_t) // cfg.batch_size, 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    hist: dict[str, list[float]] = {"item": [], "fastfill": []}
    t0 = time.monotonic()
    bar = tqdm(total=steps, desc="h+sigma", unit="step", disable=not progress, leave=False)
    done = 0
    for epoch in range(cfg.epochs_h):
        h.train()
        sigma.train()
        acc_item, acc_ff, cnt = 0.0, 0.0, 0
        for idx in _batches(len(o_t), cfg.batch_size, gen):
            if done >= steps:
                break
            item = fastfill_item_loss(h, classifier, o_t[idx], n_t[idx], y_t[idx], cfg.w_cls) + extra[idx]
            s = sigma(o_t[idx])
            # warm-up epochs: h learns the plain mean loss while sigma fits the (detached) per-item loss
            warm = epoch < cfg.sigma_warmup
            loss = item.mean() + fastfill_loss(item.detach(), s) if warm else fastfill_loss(item, s)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            acc_item += float(item.detach().mean())
            acc_ff += float(fastfill_loss(item.detach(), s.detach()))
            cnt += 1
            bar.update(1)
        hist["item"].append(acc_item / max(cnt, 1))
        hist["fastfill"].append(acc_ff / max(cnt, 1))
        bar.set_postfix(item=f"{hist['item'][-1]:.3f}")
    bar.close()
    h.eval()
    sigma.eval()
    return h, sigma, {"loss_per_epoch": hist, "train_seconds": round(time.monotonic() - t0, 1)}


@torch.no_grad()
def apply(module: nn.Module, v: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    module.eval()
    t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
    out = [module(t[i : i + batch_size]) for i in range(0, len(t), batch_size)]
    return np.ascontiguousarray(torch.cat(out).numpy(), dtype=np.float32)


# ---------------------------------------------------------------------------------------------- calibration


def _knn(gallery: np.ndarray, queries: np.ndarray, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatL2(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    d, i = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + int(exclude_self))
    if exclude_self:
        keep = i != np.arange(len(queries))[:, None]
        # drop the query itself (or the last column when it is absent)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    return d, i


def _precision_curve(d: np.ndarray, rel: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-count bins of distance -> (bin centre distance, non-increasing P(relevant | distance))."""
    order = np.argsort(d, kind="stable")
    d, rel = d[order], rel[order].astype(np.float64)
    edges = np.linspace(0, len(d), n_bins + 1).astype(int)
    bins = [(a, b) for a, b in itertools.pairwise(edges) if b > a]
    centres = np.array([d[a:b].mean() for a, b in bins])
    prec = np.array([rel[a:b].mean() for a, b in bins])
    # pool adjacent violators (non-increasing) so the map stays monotone
    blocks: list[list[float]] = []  # [value, weight, count]
    for p in prec:
        blocks.append([p, 1.0, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            v2, w2, c2 = blocks.pop()
            v1, w1, c1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    iso = np.concatenate([[v] * int(c) for v, _, c in blocks])
    return centres, iso


def fit_calibration(
    d_old: np.ndarray, rel_old: np.ndarray, d_new: np.ndarray, rel_new: np.ndarray, n_knots: int = 64
) -> dict[str, list[float]]:
    """Monotone map OLD distance -> NEW distance with the same P(relevant | distance) (so the merge ranks by
    estimated relevance); OLD precisions outside the NEW curve's range fall back to quantile matching."""
    xo, po = _precision_curve(d_old.ravel(), rel_old.ravel(), n_knots)
    xn, pn = _precision_curve(d_new.ravel(), rel_new.ravel(), 4 * n_knots)
    qmap = quantile_calibration(d_old, d_new, 4 * n_knots)
    y = np.interp(xo, qmap["x"], qmap["y"])
    for j, p in enumerate(po):
        if p > pn[0]:  # more reliable than anything on the NEW side: its nearest distance
            y[j] = min(xn[0], y[j])
        elif p >= pn[-1]:
            a = int(np.nonzero(pn >= p)[0][-1])  # pn is non-increasing
            if a == len(pn) - 1:
                y[j] = xn[a]
            else:
                p0, p1 = pn[a], pn[a + 1]
                t = 0.0 if p0 == p1 else float(np.clip((p0 - p) / (p0 - p1), 0.0, 1.0))
                y[j] = xn[a] + t * (xn[a + 1] - xn[a])
        else:  # less reliable than the NEW side's whole range: beyond it
            y[j] = max(y[j], xn[-1])
    y = np.maximum.accumulate(y)
    y = y + 1e-4 * np.arange(len(y))  # strictly increasing: keeps the OLD list's order in the merge
    x = np.concatenate([[0.0], xo, [4.0]])
    y = np.concatenate([[min(0.0, float(y[0]))], y, [max(4.0, float(y[-1]) + 1e-3)]])
    x, idx = np.unique(x, return_index=True)
    return {"x": [float(v) for v in x], "y": [float(v) for v in np.maximum.accumulate(y[idx])]}


def quantile_calibration(d_old: np.ndarray, d_new: np.ndarray, n_knots: int = 64) -> dict[str, list[float]]:
    """Quantile-match OLD-side and NEW-side neighbour distances of matching ranks."""
    qs = np.linspace(0, 1, n_knots)
    x = np.quantile(d_old.ravel(), qs)
    y = np.quantile(d_new.ravel(), qs)
    x = np.concatenate([[0.0], x, [4.0]])
    y = np.concatenate([[0.0], y, [max(4.0, y[-1])]])
    x, idx = np.unique(x, return_index=True)
    return {"x": [float(v) for v in x], "y": [float(v) for v in np.maximum.accumulate(y[idx])]}


def old_side(
    mode: str, old_feats: np.ndarray, new_feats: np.ndarray, psi: nn.Module, h: nn.Module
) -> tuple[np.ndarray, np.ndarray]:
    """(OLD gallery vectors, the query vectors that search them) on a path: reverse psi(new) over old,
    forward new over h(old), two-pass old over old."""
    if mode == "reverse":
        return old_feats, apply(psi, new_feats)
    if mode == "forward":
        return apply(h, old_feats), new_feats
    if mode == "two-pass":
        return old_feats, old_feats
    raise ValueError(f"mode must be reverse, forward or two-pass, got {mode!r}")


def calibration_data(
    mode: str,
    old_feats: np.ndarray,
    new_feats: np.ndarray,
    labels: np.ndarray,
    psi: nn.Module,
    h: nn.Module,
    k: int = 100,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-k neighbour distances and relevance on both sides for calibration (leave-one-out)."""
    k = min(k, len(labels) - 1)  # a small probe set (a gallery sample) has fewer than k other items
    g_old, q_old = old_side(mode, old_feats, new_feats, psi, h)
    d_o, i_o = _knn(g_old, q_old, k, exclude_self=True)
    d_n, i_n = _knn(new_feats, new_feats, k, exclude_self=True)
    rel_o = labels[i_o] == labels[:, None]
    rel_n = labels[i_n] == labels[:, None]
    return d_o, rel_o, d_n, rel_n


IDENTITY = {"x": [0.0, 4.0], "y": [0.0, 4.0]}


def _interp(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def f(d: np.ndarray) -> np.ndarray:
        return np.interp(d, x, y).astype(np.float32)

    return f


def select_calibration(
    mode: str,
    old_feats: np.ndarray,
    new_feats: np.ndarray,
    labels: np.ndarray,
    psi: nn.Module,
    h: nn.Module,
    sigma: nn.Module,
    n_knots: int = 64,
    n_points: int = 8,
    seed: int = 0,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Fit the candidate calibrations (identity, precision matching, quantile matching) on held-out
    *training* data and keep the one whose backfill curves (uncertainty and random order, `n_points`
    fractions, the harness's own merge) have the highest mean AUC there."""
    from models import evaluate as E

    d_o, r_o, d_n, r_n = calibration_data(mode, old_feats, new_feats, labels, psi, h)
    candidates = {
        "identity": IDENTITY,
        "precision": fit_calibration(d_o, r_o, d_n, r_n, n_knots),
        "quantile": quantile_calibration(d_o, d_n, n_knots),
    }
    gallery, queries = old_side(mode, old_feats, new_feats, psi, h)
    s = apply(sigma, old_feats)
    orders = [E.policy_order("uncertainty", len(labels), sigma=s), E.policy_order("random", len(labels), seed=seed)]
    scores: dict[str, Any] = {}
    for name, knots in candidates.items():
        x, y = np.asarray(knots["x"]), np.asarray(knots["y"])
        space = E.Space(gallery, queries, _interp(x, y))
        ev = E.Evaluator(labels, new_feats, {mode: space})
        aucs = [float(np.mean(ev.curve(o, mode, n_points)["map"])) for o in orders]
        scores[name] = {"auc_uncertainty": aucs[0], "auc_random": aucs[1], "score": float(np.mean(aucs))}
    best = max(scores, key=lambda k: scores[k]["score"])
    return candidates[best], {
        "chosen": best,
        "candidates": scores,
        "old_side_precision@100": float(r_o.mean()),
        "new_side_precision@100": float(r_n.mean()),
    }
