"""models/benefit.py and models/order.py: the merge benefit against the harness's own merge, one item at a time;
the order net as a pack file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import evaluate as E
from models.benefit import merge_benefit
from models.order import OrderConfig, OrderScore, fit_order


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def toy() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    n = 120
    labels = rng.integers(0, 4, n)
    new = _unit(rng.normal(size=(4, 12))[labels] + 0.8 * rng.normal(size=(n, 12)))
    old = _unit(rng.normal(size=(4, 6))[labels] + 1.0 * rng.normal(size=(n, 6)))
    h_old = _unit(old @ rng.normal(size=(6, 12)).astype(np.float32))
    return {"labels": labels, "new": new, "old": old, "h_old": h_old}


def _cal(d: np.ndarray) -> np.ndarray:
    return np.interp(d, [0.0, 1.0, 4.0], [0.0, 0.7, 4.0]).astype(np.float32)


def test_benefit_equals_the_merge_with_one_item_moved(toy: dict[str, np.ndarray]) -> None:
    """n * (mAP with item j alone in NEW - mAP with none), from the harness's forward-path merge."""
    k = 15
    ev = E.Evaluator(toy["labels"], toy["new"], {"forward": E.Space(toy["h_old"], toy["new"], _cal)}, k)
    ben = merge_benefit(toy["new"], toy["h_old"], toy["labels"], _cal, k)
    n = len(toy["labels"])
    base = E.ranked_metrics(ev.ranked(np.zeros(n, bool), "forward"), toy["labels"], k)[0]
    for j in range(0, n, 7):
        mask = np.zeros(n, bool)
        mask[j] = True
        moved = E.ranked_metrics(ev.ranked(mask, "forward"), toy["labels"], k)[0]
        assert ben[j] == pytest.approx(n * (moved - base), abs=1e-6)
    assert (ben > 0).any() and (ben < 0).any()  # some moves help, some hurt


@pytest.mark.parametrize("n", [120, 9])  # 9 <= k + 1: every list ends early
def test_benefit_from_a_backfill_state_equals_the_merge_with_one_more_item_moved(
    toy: dict[str, np.ndarray], n: int
) -> None:
    """From a state with a third of the items in NEW: n * (mAP with item j moved too - mAP of the state)."""
    k = 15
    lab, new, h_old = toy["labels"][:n], toy["new"][:n], toy["h_old"][:n]
    ev = E.Evaluator(lab, new, {"forward": E.Space(h_old, new, _cal)}, k)
    state = np.random.default_rng(3).random(n) < 1 / 3
    ben = merge_benefit(new, h_old, lab, _cal, k, in_new=state)
    assert np.isnan(ben[state]).all() and not np.isnan(ben[~state]).any()
    base = E.ranked_metrics(ev.ranked(state, "forward"), lab, k)[0]
    for j in np.nonzero(~state)[0][:: 3 if n > 20 else 1]:
        mask = state.copy()
        mask[j] = True
        moved = E.ranked_metrics(ev.ranked(mask, "forward"), lab, k)[0]
        assert ben[j] == pytest.approx(n * (moved - base), abs=1e-6)


def test_order_scorer_is_the_mean_of_its_nearest_targets(tmp_path: Path, toy: dict[str, np.ndarray]) -> None:
    def forward(v: np.ndarray) -> np.ndarray:
        return toy["h_old"][: len(v)]  # rows are taken in order: h of the first rows

    net, info = fit_order(toy["old"], toy["new"], toy["labels"], forward, _cal, OrderConfig(rows=120, chunk=60, k=5))
    assert info["rows"] == 120
    scripted = torch.jit.script(net)
    torch.jit.save(scripted, str(tmp_path / "order.pt"))
    loaded = torch.jit.load(str(tmp_path / "order.pt"))
    q = toy["old"][:9]
    got = loaded(torch.from_numpy(q)).numpy()
    refs, targets = net.refs.numpy(), net.targets.numpy()
    for i, v in enumerate(q):
        near = np.argsort(((refs - v) ** 2).sum(1), kind="stable")[:5]
        assert got[i] == pytest.approx(targets[near].mean(), abs=1e-5)
    assert targets.min() >= 0.0 and targets.max() <= 1.0  # rank-normalised per gallery


def test_order_scorer_handles_fewer_refs_than_k() -> None:
    net = OrderScore(torch.zeros(3, 4), torch.tensor([0.1, 0.2, 0.3]), k=10)
    assert torch.jit.script(net)(torch.ones(2, 4)).tolist() == pytest.approx([0.2, 0.2])


def test_a_pack_orders_by_its_order_net_where_it_has_one(tmp_path: Path) -> None:
    from models.artifacts import ArtifactError, load_compat, save_compat, save_order
    from models.compat import Sigma, Transform

    torch.manual_seed(0)
    manifest = {"from": "a", "to": "b", "from_dim": 6, "to_dim": 12}
    psi, h, sigma = Transform(12, 6, 16), Transform(6, 12, 16), Sigma(6)
    order = OrderScore(torch.randn(40, 6), torch.rand(40), k=3)
    v = np.random.default_rng(0).normal(size=(9, 6)).astype(np.float32)
    save_compat(psi, h, sigma, tmp_path / "p", manifest)
    plain = load_compat(tmp_path / "p")
    assert plain.order is None
    assert np.allclose(plain.uncertainty(v), sigma(torch.from_numpy(v)).detach().numpy(), atol=1e-6)
    save_order(order, tmp_path / "p", {"rows": 40})
    ordered = load_compat(tmp_path / "p")
    assert ordered.manifest["order"] == {"rows": 40}
    assert np.allclose(ordered.uncertainty(v), order(torch.from_numpy(v)).numpy(), atol=1e-6)
    (tmp_path / "p" / "order.pt").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="checksum"):
        load_compat(tmp_path / "p")
    save_compat(psi, h, sigma, tmp_path / "p", manifest)  # rewritten without one: the stale file goes
    assert not (tmp_path / "p" / "order.pt").exists() and load_compat(tmp_path / "p").order is None
