from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import compat as C
from models.artifacts import load_compat, save_compat


def _paired_features(n: int = 1024, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic (old, new, label) features: class centres plus noise, each space L2-normalised."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    c_new, c_old = rng.normal(size=(5, 12)), rng.normal(size=(5, 8))
    new = c_new[y] + 0.5 * rng.normal(size=(n, 12))
    old = c_old[y] + 0.8 * rng.normal(size=(n, 8))
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    return old.astype(np.float32), new.astype(np.float32), y.astype(np.int64)


CFG = C.CompatConfig(hidden=32, epochs_psi=6, epochs_h=6, batch_size=128, sigma_warmup=1, lr=5e-3)


def test_shapes() -> None:
    psi, h, sigma = C.Transform(12, 8, 16), C.Transform(8, 12, 16), C.Sigma(8)
    v_new, v_old = torch.randn(5, 12), torch.randn(5, 8)
    assert psi(v_new).shape == (5, 8)
    assert h(v_old).shape == (5, 12)
    assert sigma(v_old).shape == (5,)
    np.testing.assert_allclose(psi(v_new).norm(dim=1).detach().numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(h(v_old).norm(dim=1).detach().numpy(), 1.0, atol=1e-5)


def test_each_psi_loss_decreases() -> None:
    old, new, y = _paired_features()
    _, info = C.train_psi(new, old, y, CFG, progress=False)
    hist = info["loss_per_epoch"]
    for name in ("align", "contrast", "rank", "total"):
        assert all(np.isfinite(hist[name])), name
        assert hist[name][-1] < hist[name][0], (name, hist[name])


def test_h_and_sigma_losses_decrease() -> None:
    old, new, y = _paired_features()
    torch.manual_seed(0)
    classifier = nn.Linear(12, 5)
    before = [p.detach().clone() for p in classifier.parameters()]
    _, sigma, info = C.train_h_sigma(old, new, y, classifier, CFG, progress=False)
    hist = info["loss_per_epoch"]
    assert hist["item"][-1] < hist["item"][0]
    assert hist["fastfill"][-1] < hist["fastfill"][0]
    # v2's classifier stays frozen
    for a, b in zip(before, classifier.parameters(), strict=True):
        assert torch.equal(a, b)
    assert C.apply(sigma, old).shape == (len(old),)


def test_fastfill_loss_formula() -> None:
    item = torch.tensor([1.0, 4.0])
    s = torch.tensor([0.0, np.log(4.0)], dtype=torch.float32)
    expected = (0.5 * 1.0 + 0.0 + 0.5 * 1.0 + 0.5 * np.log(4.0)) / 2
    assert abs(float(C.fastfill_loss(item, s)) - expected) < 1e-6


def _piecewise_linear(d: np.ndarray, xs: list[float], ys: list[float]) -> np.ndarray:
    """Reference for a calibration map, written out (no np.interp, which CompatPack.calibrate uses): the
    segment around each distance, linear inside it, the end values outside the knots."""
    out = []
    for v in np.asarray(d, dtype=np.float64).ravel():
        if v <= xs[0]:
            out.append(ys[0])
        elif v >= xs[-1]:
            out.append(ys[-1])
        else:
            j = max(j for j in range(len(xs) - 1) if xs[j] <= v)
            t = (v - xs[j]) / (xs[j + 1] - xs[j])
            out.append(ys[j] + t * (ys[j + 1] - ys[j]))
    return np.array(out)


def _synthetic_distances(
    p_new: Callable[[np.ndarray], np.ndarray], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour distances and relevance with KNOWN precision curves. OLD: distance ~ U(0.5, 1.5),
    P(relevant | x) = 1.5 - x. NEW: distance = 0.1 + 0.5 u^2 (u ~ U(0, 1), so NEW's distance quantiles are
    not a linear image of OLD's), P(relevant | y) = p_new(y)."""
    rng = np.random.default_rng(seed)
    shape = (400, 100)
    d_old = rng.uniform(0.5, 1.5, size=shape)
    rel_old = rng.uniform(size=shape) < 1.5 - d_old
    d_new = 0.1 + 0.5 * rng.uniform(size=shape) ** 2
    rel_new = rng.uniform(size=shape) < p_new(d_new)
    return d_old.astype(np.float32), rel_old, d_new.astype(np.float32), rel_new


def test_precision_calibration_matches_the_analytic_map() -> None:
    """NEW precision 1.2 - 2y: the OLD distance x with precision 1.5 - x must map to the y of equal precision,
    y = (x - 0.3) / 2, solved by hand. Identity (y = x) and quantile matching (y = 0.1 + 0.5 (x - 0.5)^2 here)
    are both at least 0.04 away on the checked range, so neither passes for the real thing."""
    d_old, rel_old, d_new, rel_new = _synthetic_distances(lambda y: 1.2 - 2 * y)
    knots = C.fit_calibration(d_old, rel_old, d_new, rel_new, 32)
    x = np.linspace(0.6, 1.4, 33)
    want = (x - 0.3) / 2
    got = _piecewise_linear(x, knots["x"], knots["y"])
    assert np.abs(got - want).max() < 0.03, np.c_[x, got, want]
    assert np.abs((0.1 + 0.5 * (x - 0.5) ** 2) - want).min() > 0.04  # the test tells the candidates apart


def test_precision_calibration_outside_the_new_sides_precision_range() -> None:
    """NEW precision 1 - y only spans [0.4, 0.9]. OLD distances more reliable than anything on NEW (x < 0.6)
    map to about NEW's nearest distance (0.1); less reliable than all of NEW (x > 1.1) map beyond NEW's
    farthest (0.6); in between, equal precision: y = x - 0.5."""
    d_old, rel_old, d_new, rel_new = _synthetic_distances(lambda y: 1.0 - y)
    knots = C.fit_calibration(d_old, rel_old, d_new, rel_new, 32)

    def cal(x: np.ndarray) -> np.ndarray:
        return _piecewise_linear(x, knots["x"], knots["y"])

    low, mid, high = np.linspace(0.5, 0.56, 7), np.linspace(0.7, 1.0, 13), np.linspace(1.2, 1.5, 13)
    assert np.all(np.abs(cal(low) - 0.1) < 0.01), cal(low)
    assert np.abs(cal(mid) - (mid - 0.5)).max() < 0.05, cal(mid)
    assert np.all(cal(high) >= np.quantile(d_new, 0.97)), cal(high)


def test_quantile_calibration_maps_old_distances_onto_new_distribution() -> None:
    """Mapped through quantile matching, OLD's distances have NEW's distribution: the two sorted samples
    (same size) agree value by value."""
    d_old, _, d_new, _ = _synthetic_distances(lambda y: 1.0 - y)
    q = C.quantile_calibration(d_old, d_new, 32)
    mapped = np.sort(_piecewise_linear(d_old, q["x"], q["y"]))
    assert np.abs(mapped - np.sort(d_new.ravel())).max() < 0.01
    # ... which the raw OLD distances are far from
    assert np.abs(np.sort(d_old.ravel()) - np.sort(d_new.ravel())).max() > 0.3


def test_calibration_is_monotone_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d_old = rng.uniform(0.2, 1.5, size=(200, 50)).astype(np.float32)
    rel_old = rng.uniform(size=d_old.shape) < np.clip(1.2 - d_old, 0, 1)
    d_new = rng.uniform(0.1, 1.2, size=(200, 50)).astype(np.float32)
    rel_new = rng.uniform(size=d_new.shape) < np.clip(1.1 - d_new, 0, 1)
    knots = C.fit_calibration(d_old, rel_old, d_new, rel_new, 32)
    assert np.all(np.diff(knots["x"]) > 0)
    assert np.all(np.diff(knots["y"]) >= 0)
    q = C.quantile_calibration(d_old, d_new, 16)
    assert np.all(np.diff(q["y"]) >= 0)
    save_compat(
        C.Transform(12, 8, 16),
        C.Transform(8, 12, 16),
        C.Sigma(8),
        tmp_path / "c",
        {"from": "a", "to": "b", "from_dim": 8, "to_dim": 12, "calibration": {"reverse": knots}},
    )
    pack = load_compat(tmp_path / "c")
    d = np.linspace(0, 5, 126, dtype=np.float32)  # past the last knot (4.0) too
    out = pack.calibrate("reverse", d)
    assert out.dtype == np.float32 and np.all(np.diff(out) >= 0)
    np.testing.assert_allclose(out, _piecewise_linear(d, knots["x"], knots["y"]), rtol=1e-5, atol=1e-6)
    inside = d <= 4.0
    assert not np.allclose(out[inside], d[inside], atol=0.01)  # the fitted map is not the identity here
    np.testing.assert_array_equal(pack.calibrate("forward", d), d)  # absent = identity


def test_compat_torchscript_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    psi, h, sigma = C.Transform(12, 8, 16), C.Transform(8, 12, 16), C.Sigma(8)
    save_compat(psi, h, sigma, tmp_path / "c", {"from": "a", "to": "b", "from_dim": 8, "to_dim": 12})
    pack = load_compat(tmp_path / "c")
    old, new, _ = _paired_features(64)
    np.testing.assert_array_equal(pack.reverse(new), C.apply(psi, new))
    np.testing.assert_array_equal(pack.forward(old), C.apply(h, old))
    np.testing.assert_array_equal(pack.uncertainty(old), C.apply(sigma, old))
