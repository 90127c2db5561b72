"""Query paths during a rollout, their predicted backfill curves, and the choice of one that never dips.

A path is how a query reaches the two sides while an upgrade runs (NEW = backfilled items, in the new
model's space; OLD = the rest):

- ``reverse``: one pass of the new model; ``v2(q)`` searches NEW, ``psi(v2(q))`` searches OLD (``v1`` vectors).
- ``forward``: one pass of the new model; ``v2(q)`` searches NEW and OLD (``h(v1)`` vectors).
- ``two-pass``: ``v2(q)`` searches NEW, ``v1(q)`` searches OLD (two encoder passes per query).
- ``old-only``: ``v1(q)`` searches every item's ``v1`` vector; NEW is not searched until the rollout
  completes. Exactly old/old at every fraction: the path that can never dip.

OLD distances are calibrated per path (the pack's ``calibration[path]``) before the distance-rank merge.

A pack's *predictions* are these paths' backfill curves under each order policy on a held-out probe set
(the calibration split for packs trained offline), with old/old and new/new on the same set. `choose`
takes the path with the highest predicted AUC among those whose curve never falls below old/old by more
than a margin at any fraction (fraction 0 included).

The order. `random` is predicted as the mean of `RANDOM_SEEDS` permutations, and the spread of their AUCs
is the noise of the comparison: a random order's AUC varies from one permutation to the next by that much
(on the shipped pair's 5,000-image probe set, a standard deviation of 0.007 of relative gain). The learned
`uncertainty` order is kept only where its predicted AUC lies more than `ORDER_Z` standard deviations above
what random orders reach, z = (AUC_uncertainty - mean) / (sd * sqrt(1 + 1/seeds)): the test of "the learned
order is no better than a random one", under which its AUC is one more draw from the random orders'
distribution. Within the noise the rollout uses `random`: its prediction holds on any gallery, while the
learned order's holds only as far as sigma generalises from the probe set to the gallery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from models import evaluate as E

PATHS = ("reverse", "forward", "two-pass", "old-only")
SAFE_PATH = "old-only"
ENCODER_PASSES = {"reverse": 1, "forward": 1, "two-pass": 2, "old-only": 1}
ORDERS = ("uncertainty", "random")
RANDOM_SEEDS = tuple(range(8))  # permutations of the random order per path: its mean curve and its spread
# `uncertainty` must beat random orders by this many standard deviations of their AUC, or the rollout uses random.
ORDER_Z = 2.0
# A switch of path mid-rollout (an index rebuild in every API process) must add this much predicted AUC (mAP)
# over the best single path.
SWITCH_MIN_AUC = 0.002


class Pack(Protocol):
    def reverse(self, new_vecs: np.ndarray) -> np.ndarray: ...
    def forward(self, old_vecs: np.ndarray) -> np.ndarray: ...
    def uncertainty(self, old_vecs: np.ndarray) -> np.ndarray: ...
    def calibrate(self, mode: str, distances: np.ndarray) -> np.ndarray: ...


class ModulePack:
    """Freshly trained psi, h, sigma modules and their calibrations behind the `Pack` protocol (before they
    are saved as an artifact)."""

    def __init__(self, psi: Any, h: Any, sigma: Any, calibration: dict[str, Any], order: Any = None) -> None:
        self.psi, self.h, self.sigma, self.calibration, self.order = psi, h, sigma, calibration, order

    def reverse(self, v: np.ndarray) -> np.ndarray:
        from models.compat import apply

        return apply(self.psi, v)

    def forward(self, v: np.ndarray) -> np.ndarray:
        from models.compat import apply

        return apply(self.h, v)

    def uncertainty(self, v: np.ndarray) -> np.ndarray:
        from models.compat import apply

        return apply(self.order if self.order is not None else self.sigma, v).reshape(-1)

    def calibrate(self, mode: str, d: np.ndarray) -> np.ndarray:
        from models.artifacts import apply_calibration

        return apply_calibration(self.calibration.get(mode), d)


def _summary(values: list[float], old_old: float, new_new: float) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    worst = int(np.argmin(v - old_old))
    return {
        "map": [round(float(x), 5) for x in v],
        **{key: round(val, 5) for key, val in E.summarize(values, old_old, new_new).items()},
        "worst_margin": round(float(v[worst] - old_old), 5),
        "worst_fraction": round(float(E.fractions(len(v))[worst]), 4),
    }


def predict(
    old: np.ndarray,
    new: np.ndarray,
    labels: np.ndarray,
    pack: Pack,
    probe: dict[str, Any] | None = None,
    k: int = E.K,
    n_points: int = E.N_POINTS,
) -> dict[str, Any]:
    """Predicted curves (mAP@k at `n_points` fractions) of every path x order on one labelled probe set."""
    ev = E.pair_evaluator(old, new, labels, pack, k)
    n = len(labels)
    old_old = ev.single("raw")[0]
    new_new = ev.single("new")[0]
    sigma = pack.uncertainty(old)
    curves: dict[str, dict[str, Any]] = {}
    for path in PATHS:
        curves[path] = {}
        for order in ORDERS:
            if order == "random":  # the mean of the seeds' curves, each kept: their spread is the noise
                runs = [ev.curve(E.policy_order("random", n, seed=s), path, n_points)["map"] for s in RANDOM_SEEDS]
                curves[path][order] = {
                    **_summary(list(np.mean(runs, axis=0)), old_old, new_new),
                    "seeds": [[round(float(x), 5) for x in run] for run in runs],
                }
            else:
                values = ev.curve(E.policy_order("uncertainty", n, sigma=sigma), path, n_points)["map"]
                curves[path][order] = _summary(values, old_old, new_new)
    return {
        "probe": probe or {"n": n},
        "k": k,
        "reverse_rescore_depth": E.RESCORE_DEPTH,
        "fractions": [round(float(f), 5) for f in E.fractions(n_points)],
        "old_old": round(old_old, 5),
        "new_new": round(new_new, 5),
        "curves": curves,
    }


@dataclass(frozen=True)
class Choice:
    """A path (or a schedule of two) and an order for a rollout, why, and what the prediction says."""

    mode: str  # the path serving from fraction 0
    policy: str
    reason: str
    predicted: dict[str, Any] | None  # the chosen curve's summary and `schedule` (None without predictions)
    dips: bool  # the chosen curve falls below old/old - margin somewhere (only when forced)


class PathRefused(ValueError):
    """An explicit path the prediction says would dip below old/old; `curve` is its predicted summary."""

    def __init__(self, mode: str, policy: str, curve: dict[str, Any], old_old: float, margin: float) -> None:
        self.mode, self.policy, self.curve = mode, policy, curve
        super().__init__(
            f"{mode} / {policy} is predicted to fall to {min(curve['map']):.4f} at fraction "
            f"{curve['worst_fraction']} against old/old {old_old:.4f} (margin {margin}); "
            "choose mode auto, or force"
        )


def _safe(values: Any, old_old: float, margin: float) -> bool:
    return float(np.min(values)) >= old_old - margin - 1e-9  # the seed average leaves float noise


@dataclass(frozen=True)
class _Plan:
    schedule: tuple[tuple[float, str], ...]  # (from fraction, path), first at 0
    values: np.ndarray
    passes: float  # mean encoder passes per query over the fractions

    @property
    def key(self) -> tuple[float, float, int]:
        """Highest AUC; then fewer encoder passes; then a single path over a switch."""
        return round(float(self.values.mean()), 6), -self.passes, -len(self.schedule)


def _plans(curves: dict[str, Any], order: str, old_old: float, margin: float) -> list[_Plan]:
    """Every single path, and every switch from one path to another at a measured fraction, that never
    falls below old/old - margin (a switch lets a safe start hand over to a path that dips only early)."""
    values = {p: np.asarray(curves[p][order]["map"], dtype=np.float64) for p in PATHS}
    n = len(values[PATHS[0]])
    fr = np.linspace(0.0, 1.0, n)
    plans = []
    for a in PATHS:
        for b in PATHS:
            for i in [0] if a == b else range(1, n):
                v = np.concatenate([values[a][:i], values[b][i:]])
                if not _safe(v, old_old, margin):
                    continue
                sched = ((0.0, a),) if a == b else ((0.0, a), (round(float(fr[i]), 5), b))
                passes = (i * ENCODER_PASSES[a] + (n - i) * ENCODER_PASSES[b]) / n
                plans.append(_Plan(sched, v, passes))
    return plans


def _best(plans: list[_Plan]) -> _Plan:
    single = max((p for p in plans if len(p.schedule) == 1), key=lambda p: p.key)  # old-only is always there
    switches = [p for p in plans if len(p.schedule) > 1]
    switch = max(switches, key=lambda p: p.key) if switches else None
    if switch is not None and switch.values.mean() >= single.values.mean() + SWITCH_MIN_AUC:
        return switch
    return single


def _summary_of(values: np.ndarray, predictions: dict[str, Any]) -> dict[str, Any]:
    return _summary(list(values), float(predictions["old_old"]), float(predictions["new_new"]))


def schedule_paths(schedule: Any, n: int) -> list[str]:
    """The path at each of `n` evenly spaced fractions under a schedule ((from fraction, path), ...). The
    switch fractions are stored rounded to 5 decimals, hence the tolerance."""
    return [[str(p) for start, p in schedule if f >= float(start) - 1e-4][-1] for f in E.fractions(n)]


def _seed_values(curves: dict[str, Any], schedule: tuple[tuple[float, str], ...], n: int) -> list[np.ndarray]:
    """Each random seed's curve along a schedule (a path per fraction, spliced at the switch). Empty when the
    predictions carry no per-seed curves (packs annotated before they were kept)."""
    at = schedule_paths(schedule, n)
    per_path = {p: (curves[p]["random"].get("seeds") or []) for p in set(at)}
    m = min(len(v) for v in per_path.values())
    return [np.array([per_path[p][s][i] for i, p in enumerate(at)], dtype=np.float64) for s in range(m)]


def order_test(unc_auc: float, seed_aucs: list[float]) -> dict[str, float] | None:
    """The learned order's predicted AUC against the random orders' AUCs on the same probe set: z =
    (AUC - mean) / (sd * sqrt(1 + 1/m)), the standardised gap if the learned order were one more random draw.
    None with fewer than two seeds (no spread to measure)."""
    a = np.asarray(seed_aucs, dtype=np.float64)
    if len(a) < 2:
        return None
    mean, sd = float(a.mean()), float(a.std(ddof=1))
    scale = sd * float(np.sqrt(1.0 + 1.0 / len(a)))
    gap = unc_auc - mean
    z = gap / scale if scale > 0 else (float("inf") if gap > 1e-9 else 0.0)
    return {"z": round(z, 3), "random_mean": round(mean, 5), "random_sd": round(sd, 5), "seeds": len(a)}


def _order(unc_values: np.ndarray, seed_values: list[np.ndarray]) -> tuple[str, str]:
    """(order, reason note) for a requested `uncertainty`: kept only when z > ORDER_Z."""
    u = float(np.mean(unc_values))
    t = order_test(u, [float(np.mean(v)) for v in seed_values])
    if t is None:
        return "random", "; order random: the predictions carry no random-order spread (`backfill eval predict`)"
    order = "uncertainty" if t["z"] > ORDER_Z else "random"
    verdict = "beats" if order == "uncertainty" else "does not beat"
    return order, (
        f"; order {order}: uncertainty's predicted AUC {u:.4f} {verdict} random orders' {t['random_mean']:.4f} "
        f"(sd {t['random_sd']:.4f} over {t['seeds']} seeds) by more than {ORDER_Z:g} sd: z = {t['z']:+.2f}"
    )


def _auto(predictions: dict[str, Any], policy: str, margin: float) -> Choice:
    curves, old_old = predictions["curves"], float(predictions["old_old"])
    orders = ["uncertainty", "random"] if policy == "uncertainty" else ["random"]
    best = {o: _best(_plans(curves, o, old_old, margin)) for o in orders}
    order, note = "random", ""
    if policy == "uncertainty":
        rnd = best["random"]
        order, note = _order(best["uncertainty"].values, _seed_values(curves, rnd.schedule, len(rnd.values)))
    plan = best[order]
    steps = " then ".join(f"{p} from {f:g}" for f, p in plan.schedule)
    reason = f"auto: {steps}, the highest predicted AUC that never falls below old/old - {margin}{note}"
    summary = _summary_of(plan.values, predictions)
    predicted = {**summary, "old_old": old_old, "schedule": [list(x) for x in plan.schedule]}
    return Choice(plan.schedule[0][1], order if policy in ORDERS else policy, reason, predicted, False)


def choose(
    predictions: dict[str, Any] | None,
    preference: str = "auto",
    policy: str = "uncertainty",
    margin: float = 0.0,
    force: bool = False,
) -> Choice:
    """The rollout's path and order. `auto`: the highest predicted AUC among the paths (and switches from
    one path to another at a fraction) that never fall below old/old - margin; old-only always qualifies.
    `uncertainty` is kept only where it beats random orders by more than ORDER_Z sd (`order_test`). An explicit path
    predicted to dip raises `PathRefused` unless `force`. Without predictions, `auto` is old-only and an
    explicit path is taken as asked."""
    if preference != "auto" and preference not in PATHS:
        raise ValueError(f"unknown path {preference!r}")
    if not predictions:
        mode = SAFE_PATH if preference == "auto" else preference
        why = "the compat pack carries no predictions (`backfill eval predict`)"
        return Choice(mode, policy, f"{mode}: {why}", None, False)
    if preference == "auto":
        if policy not in ORDERS:  # fifo: no prediction of its own; random's stands in
            c = _auto(predictions, "random", margin)
            return Choice(c.mode, policy, c.reason, c.predicted, False)
        return _auto(predictions, policy, margin)
    curves, old_old = predictions["curves"], float(predictions["old_old"])
    mode, order, note = preference, policy if policy in ORDERS else "random", ""
    if policy == "uncertainty" and mode != SAFE_PATH:
        unc = np.asarray(curves[mode]["uncertainty"]["map"], dtype=np.float64)
        order, note = _order(unc, _seed_values(curves, ((0.0, mode),), len(unc)))
    curve = curves[mode][order]
    dips = not _safe(curve["map"], old_old, margin)
    if dips and not force:
        raise PathRefused(mode, order, curve, old_old, margin)
    reason = "requested"
    if dips:
        reason = f"forced: predicted to dip to {curve['worst_margin']:+.4f} at fraction {curve['worst_fraction']}"
    summary = {key: curve[key] for key in ("auc", "relative_gain", "worst_margin", "worst_fraction", "map")}
    predicted = {**summary, "old_old": old_old, "schedule": [[0.0, mode]]}
    return Choice(mode, order if policy in ORDERS else policy, reason + note, predicted, dips)


def scheduled_path(predicted: dict[str, Any] | None, fraction: float) -> str | None:
    """The path a rollout's schedule wants at `fraction` backfilled (None without a schedule)."""
    schedule = (predicted or {}).get("schedule") or []
    path = None
    for start, p in schedule:
        if fraction >= float(start) - 1e-9:
            path = p
    return path


def annotate_pack(
    pack_dir: Any, old_dir: Any, new_dir: Any, images: np.ndarray, labels: np.ndarray, probe: dict[str, Any]
) -> dict[str, Any]:
    """Fit the two-pass calibration where the pack lacks one and write the predictions of every path on the
    probe set (`images`, `labels`: held-out *training* data) into the pack's manifest. Returns them."""
    from models import compat as C
    from models.artifacts import load_compat, load_encoder, update_manifest

    pack = load_compat(pack_dir)
    v_old, v_new = load_encoder(old_dir).embed(images), load_encoder(new_dir).embed(images)
    calibration = dict(pack.manifest.get("calibration") or {})
    metrics = dict(pack.manifest.get("metrics") or {})
    if "two-pass" not in calibration:
        knots = int((pack.manifest.get("config") or {}).get("calib_knots", 64))
        calibration["two-pass"], fit = C.select_calibration(
            "two-pass", v_old, v_new, labels, pack.psi, pack.h, pack.sigma, knots
        )
        metrics["calibration"] = {**(metrics.get("calibration") or {}), "two-pass": fit}
        pack.manifest["calibration"] = calibration
    predictions = predict(v_old, v_new, labels, pack, probe={**probe, "n": len(labels)})
    update_manifest(pack_dir, calibration=calibration, metrics=metrics, predictions=predictions)
    return predictions
