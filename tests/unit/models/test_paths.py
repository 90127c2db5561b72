"""models/paths.py: predicted curves against independent computations, and the choice of a path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models import evaluate as E
from models import harness as H
from models.paths import (
    ORDER_Z,
    PATHS,
    RANDOM_SEEDS,
    PathRefused,
    choose,
    order_test,
    predict,
    schedule_paths,
    scheduled_path,
)


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


class ToyPack:
    """Linear psi / h, a monotone two-pass calibration, sigma = a fixed projection of the old vector."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.p = rng.normal(size=(16, 8)).astype(np.float32)
        self.q = rng.normal(size=(8, 16)).astype(np.float32)
        self.s = rng.normal(size=8).astype(np.float32)

    def reverse(self, v: np.ndarray) -> np.ndarray:
        return _unit(v @ self.p)

    def forward(self, v: np.ndarray) -> np.ndarray:
        return _unit(v @ self.q)

    def uncertainty(self, v: np.ndarray) -> np.ndarray:
        return (v @ self.s).astype(np.float32)

    def calibrate(self, mode: str, d: np.ndarray) -> np.ndarray:
        return (0.5 * np.asarray(d) if mode == "two-pass" else np.asarray(d)).astype(np.float32)


@pytest.fixture(scope="module")
def toy() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    n = 240
    labels = rng.integers(0, 5, n)
    new = _unit(rng.normal(size=(5, 16))[labels] + 0.6 * rng.normal(size=(n, 16)))
    old = _unit(rng.normal(size=(5, 8))[labels] + 1.1 * rng.normal(size=(n, 8)))
    pack = ToyPack(rng)
    return {"labels": labels, "new": new, "old": old, "pack": pack, "pred": predict(old, new, labels, pack, k=20)}


def _brute_map(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray, k: int) -> float:
    aps = []
    for q in range(len(labels)):
        d = ((gallery - queries[q]) ** 2).sum(1)
        d[q] = np.inf
        cand = np.argsort(d, kind="stable")[:k]
        rel = labels[cand] == labels[q]
        hits = np.cumsum(rel)
        aps.append(float((rel * hits / np.arange(1, k + 1)).sum() / max(rel.sum(), 1)))
    return float(np.mean(aps))


def test_random_is_the_mean_of_its_seeds(toy: dict[str, Any]) -> None:
    for path in PATHS:
        rnd = toy["pred"]["curves"][path]["random"]
        assert len(rnd["seeds"]) == len(RANDOM_SEEDS) >= 3
        assert np.allclose(np.mean(rnd["seeds"], axis=0), rnd["map"], atol=1e-5)
    # distinct permutations: the merging paths' seed curves differ somewhere
    assert len({tuple(s) for s in toy["pred"]["curves"]["forward"]["random"]["seeds"]}) > 1


def test_ends_and_the_safe_path_against_brute_force(toy: dict[str, Any]) -> None:
    pred, labels = toy["pred"], toy["labels"]
    old_old = _brute_map(toy["old"], toy["old"], labels, 20)
    new_new = _brute_map(toy["new"], toy["new"], labels, 20)
    assert pred["old_old"] == pytest.approx(old_old, abs=1e-5) and pred["new_new"] == pytest.approx(new_new, abs=1e-5)
    for order in ("uncertainty", "random"):
        assert np.allclose(pred["curves"]["old-only"][order]["map"], old_old, atol=1e-5)
        assert pred["curves"]["two-pass"][order]["map"][0] == pytest.approx(old_old, abs=1e-5)  # v1 queries, all OLD
        for path in ("reverse", "forward", "two-pass"):
            assert pred["curves"][path][order]["map"][-1] == pytest.approx(new_new, abs=1e-5)
    rev0 = _brute_rescored_map(toy, 20, E.RESCORE_DEPTH)
    assert pred["curves"]["reverse"]["uncertainty"]["map"][0] == pytest.approx(rev0, abs=1e-5)


def _brute_rescored_map(toy: dict[str, Any], k: int, depth: int) -> float:
    """The reverse path at fraction 0: each query's depth*k nearest v1 vectors by psi(v2(q)), re-ranked by
    ||v2(q) - h(v1)||^2 (the toy's forward calibration is the identity)."""
    pack, labels = toy["pack"], toy["labels"]
    psi_q, h_old = pack.reverse(toy["new"]), pack.forward(toy["old"])
    aps = []
    for q in range(len(labels)):
        d = ((toy["old"] - psi_q[q]) ** 2).sum(1)
        d[q] = np.inf
        cand = np.argsort(d, kind="stable")[: depth * k]
        cand = cand[np.argsort(((h_old[cand] - toy["new"][q]) ** 2).sum(1), kind="stable")][:k]
        rel = labels[cand] == labels[q]
        aps.append(float((rel * np.cumsum(rel) / np.arange(1, k + 1)).sum() / max(rel.sum(), 1)))
    return float(np.mean(aps))


def test_an_interior_point_equals_the_dense_merge(toy: dict[str, Any]) -> None:
    """Point 5/21 of two-pass / uncertainty, recomputed the dense way (full merged matrix, full sort)."""
    labels, pack = toy["labels"], toy["pack"]
    n = len(labels)
    order = np.argsort(-pack.uncertainty(toy["old"]), kind="stable")
    in_new = np.zeros(n, bool)
    in_new[order[: E.n_in_new(5 / 21, n)]] = True
    ev = E.pair_evaluator(toy["old"], toy["new"], labels, pack, k=20)
    dense, _ = H.dense_point(ev, in_new, "two-pass")
    assert toy["pred"]["curves"]["two-pass"]["uncertainty"]["map"][5] == pytest.approx(dense, abs=1e-5)


def _pred(curves: dict[str, list[float]], old_old: float = 0.5, spread: float = 0.0) -> dict[str, Any]:
    """Synthetic predictions: the same curve for both orders unless given as path:order. The random order's
    seeds are its curve shifted by -spread, 0 and +spread at the interior points (mean = the curve)."""
    out: dict[str, Any] = {"old_old": old_old, "new_new": 0.9, "curves": {}}
    for path in PATHS:
        for order in ("uncertainty", "random"):
            values = curves.get(f"{path}:{order}", curves.get(path, [old_old] * 4))
            v = np.asarray(values)
            out["curves"].setdefault(path, {})[order] = {
                "map": list(values),
                "auc": float(v.mean()),
                "relative_gain": float((v.mean() - old_old) / (0.9 - old_old)),
                "worst_margin": float(v.min() - old_old),
                "worst_fraction": float(np.argmin(v) / (len(v) - 1)),
            }
            if order == "random":
                bump = np.r_[0.0, np.ones(len(v) - 2), 0.0]
                out["curves"][path][order]["seeds"] = [list(v + d * spread * bump) for d in (-1, 0, 1)]
    return out


def test_auto_takes_the_highest_auc_that_never_dips() -> None:
    pred = _pred(
        {
            "reverse": [0.45, 0.85, 0.9, 0.9],  # best AUC alone, but starts below old/old
            "forward": [0.5, 0.7, 0.8, 0.9],
            "two-pass": [0.5, 0.6, 0.7, 0.9],
        }
    )
    c = choose(pred)
    # a safe start hands over to reverse once reverse no longer dips: [0.5, 0.85, 0.9, 0.9]; forward and
    # two-pass start equally well, forward with one encoder pass
    assert c.mode == "forward" and not c.dips
    assert c.predicted is not None and c.predicted["schedule"] == [[0.0, "forward"], [0.33333, "reverse"]]
    assert c.predicted["auc"] == pytest.approx(np.mean([0.5, 0.85, 0.9, 0.9]), abs=1e-5)
    assert scheduled_path(c.predicted, 0.2) == "forward" and scheduled_path(c.predicted, 0.4) == "reverse"
    with pytest.raises(PathRefused, match=r"fall to 0\.4500 at fraction 0\.0"):
        choose(pred, "reverse")
    forced = choose(pred, "reverse", force=True)
    assert forced.mode == "reverse" and forced.dips and forced.reason.startswith("forced")
    # a switch that gains nothing loses to the single path
    no_switch = _pred({"reverse": [0.45, 0.45, 0.8, 0.9], "forward": [0.5, 0.7, 0.8, 0.9]})
    assert choose(no_switch).predicted["schedule"] == [[0.0, "forward"]]  # type: ignore[index]
    # a margin admits a small dip that no single switch can avoid
    late_dip = _pred({"reverse": [0.5, 0.9, 0.47, 0.9]})
    assert choose(late_dip).predicted["schedule"] != [[0.0, "reverse"]]  # type: ignore[index]
    assert choose(late_dip, margin=0.06).predicted["schedule"] == [[0.0, "reverse"]]  # type: ignore[index]


def test_every_path_dips_leaves_old_only_and_ties_prefer_fewer_passes() -> None:
    dipping = _pred({p: [0.49, 0.9, 0.9, 0.9] for p in ("reverse", "forward", "two-pass")})
    assert choose(dipping).mode == "old-only"
    tie = _pred({"two-pass": [0.5, 0.7, 0.8, 0.9], "forward": [0.5, 0.7, 0.8, 0.9]})
    assert choose(tie).mode == "forward"  # one encoder pass beats two at equal AUC


def test_order_test_is_the_standardised_gap_to_the_random_seeds() -> None:
    seeds = [0.80, 0.81, 0.83, 0.82]
    t = order_test(0.85, seeds)
    assert t is not None and t["seeds"] == 4
    expected = (0.85 - np.mean(seeds)) / (np.std(seeds, ddof=1) * np.sqrt(1 + 1 / 4))
    assert t["z"] == pytest.approx(expected, abs=1e-3) and t["random_mean"] == pytest.approx(0.815)
    assert order_test(0.85, [0.8]) is None  # one seed: no spread


def test_uncertainty_is_kept_only_beyond_the_random_orders_spread() -> None:
    rnd = [0.5, 0.7, 0.8, 0.9]
    ahead = [0.5, 0.72, 0.82, 0.9]  # AUC 0.01 above random's mean
    # seed AUCs spread by +-0.0025 (sd 0.0025): z = 0.01 / (0.0025 * sqrt(4/3)) = 3.5 > ORDER_Z
    tight = _pred({"forward:uncertainty": ahead, "forward:random": rnd}, spread=0.005)
    c = choose(tight)
    assert (c.mode, c.policy) == ("forward", "uncertainty") and "z = +3.46" in c.reason
    assert choose(tight, "forward").policy == "uncertainty"
    # the same gap within a spread four times as wide: z = 0.87, random orders reach it; random is used
    wide = _pred({"forward:uncertainty": ahead, "forward:random": rnd}, spread=0.02)
    c = choose(wide)
    assert (c.mode, c.policy) == ("forward", "random") and "does not beat" in c.reason and "z = +0.87" in c.reason
    assert choose(wide, "forward").policy == "random"
    assert 3.46 > ORDER_Z > 0.87
    # a learned order below random is never kept, however tight the spread
    behind = _pred({"forward:uncertainty": [0.5, 0.68, 0.78, 0.9], "forward:random": rnd}, spread=0.001)
    assert choose(behind).policy == "random"
    # predictions without per-seed curves (annotated before they were kept): no spread, random
    legacy = _pred({"forward:uncertainty": ahead, "forward:random": rnd}, spread=0.005)
    for path in PATHS:
        del legacy["curves"][path]["random"]["seeds"]
    c = choose(legacy)
    assert c.policy == "random" and "no random-order spread" in c.reason
    assert choose(wide, "forward", policy="fifo").policy == "fifo"  # explicit non-learned orders stay


def test_schedule_paths_switch_at_the_stored_rounded_fraction() -> None:
    """A switch stored as round(4/21, 5) = 0.19048 takes effect at point 4 (4/21 = 0.190476...), as in `_plans`."""
    at = schedule_paths([[0.0, "forward"], [0.19048, "reverse"]], 22)
    assert at[:4] == ["forward"] * 4 and at[4:] == ["reverse"] * 18
    assert schedule_paths([[0.0, "two-pass"]], 4) == ["two-pass"] * 4


def test_the_order_test_follows_a_switching_schedule() -> None:
    """The random orders' AUCs are taken along the chosen schedule, spliced at the switch like the curve."""
    pred = _pred(
        {
            "reverse": [0.45, 0.85, 0.9, 0.9],
            "forward": [0.5, 0.7, 0.8, 0.9],
            "forward:uncertainty": [0.5, 0.75, 0.8, 0.9],
        },
        spread=0.01,
    )
    # the seeds of reverse after the switch spread by 0.01 at two points, forward's at one
    for seed, d in zip(pred["curves"]["reverse"]["random"]["seeds"], (-1, 0, 1), strict=True):
        seed[:] = [0.45, 0.85 + d * 0.01, 0.9 + d * 0.01, 0.9]
    c = choose(pred)
    assert c.predicted is not None and c.predicted["schedule"] == [[0.0, "forward"], [0.33333, "reverse"]]
    # uncertainty's best plan is the same switch (0.5, 0.85, 0.9, 0.9): equal to random's mean, so random
    assert c.policy == "random" and "z = +0.00" in c.reason


def test_without_predictions_auto_is_old_only() -> None:
    c = choose(None)
    assert c.mode == "old-only" and c.predicted is None and "no predictions" in c.reason
    assert choose(None, "reverse").mode == "reverse"


def test_the_pairs_order_table_reports_z_and_both_gallery_gains() -> None:
    from cli.evaluate import order_table

    pred = _pred({"forward:uncertainty": [0.5, 0.72, 0.82, 0.9], "forward:random": [0.5, 0.7, 0.8, 0.9]}, spread=0.005)
    curves = [
        {"mode": m, "policy": o, "relative_gain": g} for m in PATHS for o, g in (("uncertainty", 0.8), ("random", 0.7))
    ]
    text = order_table([{"pair": "toy", "predictions": pred, "result": {"curves": curves}}])
    forward = next(line for line in text.splitlines() if line.startswith("| toy | forward |"))
    assert "+3.46 | uncertainty | 0.800 | 0.700 |" in forward
    assert "| toy | old-only |" not in text
