"""The offline harness over the definitions of models/evaluate.py: every path x policy curve of a pair, the
dense baseline that checks (and times) the FAISS top-k evaluation, and the outputs (curve.json, curve.md,
curve.png)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluate import (
    MODES,
    N_POINTS,
    POLICIES,
    Evaluator,
    ap_at_k,
    build_evaluator,
    fractions,
    n_in_new,
    policy_order,
    summarize,
)

# ----------------------------------------------------------------------------------------- dense baseline


def dense_point(ev: Evaluator, in_new: np.ndarray, mode: str) -> tuple[float, float]:
    """The same point the dense way: the full N x N merged distance matrix and a full sort per query."""
    in_new = np.asarray(in_new, dtype=bool)
    sp = ev.old_spaces[mode]
    n = len(ev.labels)
    aps, top1 = np.empty(n), np.empty(n)
    step = 1000
    for a in range(0, n, step):
        b = min(a + step, n)
        qn = ev.new[a:b]
        d_new = (qn**2).sum(1)[:, None] + (ev.new**2).sum(1)[None, :] - 2 * qn @ ev.new.T
        qo = sp.queries[a:b]
        d_old = (qo**2).sum(1)[:, None] + (sp.gallery**2).sum(1)[None, :] - 2 * qo @ sp.gallery.T
        d_old = np.maximum(d_old, 0).astype(np.float32)
        if sp.rescore is None:
            d_old = sp.calibrate(d_old)
        else:  # only each query's `depth * k` nearest OLD items (self and NEW excluded) count, re-scored
            r = sp.rescore
            d_old[in_new[None, :] | (np.arange(n)[None, :] == np.arange(a, b)[:, None])] = np.inf
            cand = np.argsort(d_old, axis=1, kind="stable")[:, : r.depth * ev.k]
            hr = r.queries[a:b]
            d_r = (hr**2).sum(1)[:, None] + (r.gallery**2).sum(1)[None, :] - 2 * hr @ r.gallery.T
            keep = np.zeros_like(d_old, dtype=bool)
            np.put_along_axis(keep, cand, np.isfinite(np.take_along_axis(d_old, cand, 1)), 1)
            d_old = np.where(keep, r.calibrate(np.maximum(d_r, 0).astype(np.float32)), np.inf)
        d = np.where(in_new[None, :], np.maximum(d_new, 0), d_old)
        d[np.arange(b - a), np.arange(a, b)] = np.inf
        order = np.argsort(d, axis=1, kind="stable")
        ap, t1 = ap_at_k(order[:, : ev.k], ev.labels, ev.labels[a:b], ev.k)
        aps[a:b], top1[a:b] = ap, t1
    return float(aps.mean()), float(top1.mean())


# ------------------------------------------------------------------------------------------------ harness


def run_harness(
    images: np.ndarray,
    labels: np.ndarray,
    artifacts_dir: Path,
    out: Path | None = None,
    old: str = "v1",
    new: str = "v2",
    seed: int = 0,
    dense_points: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """All configurations; writes curve.json, curve.png, curve.md under `out` when given."""
    t_all = time.monotonic()
    t0 = time.monotonic()
    ev, sig = build_evaluator(images, labels, artifacts_dir, old, new, references=True)
    embed_s = time.monotonic() - t0
    old_old, old_old_t1 = ev.single("raw")
    new_new, new_new_t1 = ev.single("new")
    result: dict[str, Any] = {
        "n": len(labels),
        "k": ev.k,
        "old": old,
        "new": new,
        "fractions": [float(f) for f in fractions()],
        "old_old": {"map": old_old, "top1": old_old_t1},
        "new_new": {"map": new_new, "top1": new_new_t1},
        "curves": all_curves(ev, sig, old_old, new_new, seed, progress),
    }
    if dense_points > 0:
        result["dense_timing"] = dense_timing(ev, sig, dense_points, progress)
    result["embed_seconds"] = round(embed_s, 2)
    result["total_seconds"] = round(time.monotonic() - t_all, 2)
    if out is not None:
        write_outputs(result, Path(out))
    return result


def all_curves(
    ev: Evaluator, sig: dict[str, np.ndarray], old_old: float, new_new: float, seed: int, progress: bool
) -> list[dict[str, Any]]:
    """The raw-merge baseline, every mode x policy curve, and the ablation `reverse-psi` (the reverse path
    without re-scoring), with their summaries and timings."""
    from tqdm import tqdm

    n = len(ev.labels)
    configs: list[tuple[str, str, str]] = [("raw", "random", "baseline raw merge")]
    configs += [(mode, policy, f"{mode} / {policy}") for mode in MODES for policy in POLICIES]
    if "reverse-psi" in ev.old_spaces:
        configs += [("reverse-psi", p, f"reverse without re-scoring / {p}") for p in ("random", "uncertainty")]
    curves: list[dict[str, Any]] = []
    bar = tqdm(total=len(configs) * N_POINTS, desc="backfill curves", unit="pt", disable=not progress)
    for mode, policy, name in configs:
        oracle = sig["oracle_forward"] if mode == "forward" else sig["oracle_reverse"]
        order = policy_order(
            policy, n, sigma=sig["sigma"], oracle_distance=oracle, seed=seed, benefit=sig.get("benefit")
        )
        t0 = time.monotonic()
        c = ev.curve(order, mode, progress=bar)
        secs = time.monotonic() - t0
        curves.append(
            {
                "name": name,
                "mode": mode,
                "policy": policy,
                **c,
                **summarize(c["map"], old_old, new_new),
                "seconds": round(secs, 2),
            }
        )
        bar.set_postfix(last=name, secs=f"{secs:.1f}")
    bar.close()
    return curves


def dense_timing(ev: Evaluator, sig: dict[str, np.ndarray], dense_points: int, progress: bool) -> dict[str, Any]:
    """One configuration (reverse / uncertainty) both ways: FAISS top-k (a fresh evaluator, so the timing
    includes its full-gallery searches) against the dense n x n matrix + full sort per query, the latter
    timed on `dense_points` points and extrapolated to the curve's 22."""

    n = len(ev.labels)
    order = policy_order("uncertainty", n, sigma=sig["sigma"])
    fresh = Evaluator(ev.labels, ev.new, {"reverse": ev.old_spaces["reverse"]}, ev.k)
    t0 = time.monotonic()
    fc = fresh.curve(order, "reverse")
    t_faiss = time.monotonic() - t0
    per_point, max_diff, points = time_dense_points(ev, order, fc["map"], dense_points, progress)
    dense_curve = per_point * N_POINTS
    return {
        "configuration": "reverse / uncertainty",
        "faiss_seconds_per_curve": t_faiss,
        "points_timed": points,
        "dense_seconds_per_point": per_point,
        "dense_seconds_per_curve_extrapolated": dense_curve,
        "ratio_dense_over_faiss": dense_curve / max(t_faiss, 1e-9),
        "max_abs_map_difference": max_diff,
    }


def time_dense_points(
    ev: Evaluator, order: np.ndarray, reference_map: list[float], n_points: int, progress: bool = False
) -> tuple[float, float, int]:
    """Time the dense n x n approach (reverse mode) on `n_points` of the 22 points, spread evenly; returns
    (seconds per point, largest |mAP difference| against `reference_map`, points timed)."""
    from tqdm import tqdm

    n = len(ev.labels)
    picks = np.linspace(0, N_POINTS - 1, n_points).round().astype(int)
    fr = fractions()
    t_dense, diffs = 0.0, []
    for p in tqdm(picks, desc="dense timing", unit="pt", disable=not progress):
        mask = np.zeros(n, bool)
        mask[order[: n_in_new(fr[p], n)]] = True
        t0 = time.perf_counter()
        dm, _ = dense_point(ev, mask, "reverse")
        t_dense += time.perf_counter() - t0
        diffs.append(abs(dm - reference_map[p]))
    return t_dense / len(picks), float(max(diffs)), len(picks)


def table(result: dict[str, Any]) -> str:
    oo, nn_ = result["old_old"], result["new_new"]
    lines = [
        f"Backfill curves: {result['old']} -> {result['new']}, N = {result['n']} (gallery = queries, "
        f"leave-one-out), mAP@{result['k']}; 22 points at fractions i/21.",
        "",
        "| configuration | AUC (mAP@100) | relative gain | largest negative flip | flips | "
        "mAP at 0 | mAP at 1/21 | top-1 AUC | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| old/old | {oo['map']:.4f} | 0 | - | - | - | - | {oo['top1']:.4f} | - |",
        f"| new/new | {nn_['map']:.4f} | 1 | - | - | - | - | {nn_['top1']:.4f} | - |",
    ]
    for c in result["curves"]:
        lines.append(
            f"| {c['name']} | {c['auc']:.4f} | {c['relative_gain']:.3f} | {c['largest_negative_flip']:.4f} | "
            f"{c['negative_flips']} | {c['map'][0]:.4f} | {c['map'][1]:.4f} | {float(np.mean(c['top1'])):.4f} | "
            f"{c['seconds']:.1f} |"
        )
    dt = result.get("dense_timing")
    if dt:
        lines += [
            "",
            f"Dense baseline (full {result['n']}x{result['n']} distance matrix + full sort per query), "
            f"{dt['configuration']}: {dt['dense_seconds_per_point']:.2f} s/point on {dt['points_timed']} points, "
            f"so {dt['dense_seconds_per_curve_extrapolated']:.0f} s for the 22-point curve, against "
            f"{dt['faiss_seconds_per_curve']:.1f} s with FAISS top-k (ratio {dt['ratio_dense_over_faiss']:.1f}x); "
            f"max |mAP difference| on the timed points {dt['max_abs_map_difference']:.2e}.",
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"raw": ":", "reverse": "-", "forward": "--", "two-pass": "-.", "reverse-psi": (0, (1, 1))}
    colors = {"random": "tab:blue", "uncertainty": "tab:green", "oracle": "tab:purple", "benefit": "tab:orange"}
    for c in result["curves"]:
        color = "tab:red" if c["mode"] == "raw" else colors[c["policy"]]
        ax.plot(
            c["fraction"],
            c["map"],
            ls=styles[c["mode"]],
            color=color,
            marker=".",
            label=f"{c['name']} (gain {c['relative_gain']:.2f})",
        )
    ax.axhline(result["old_old"]["map"], color="gray", ls="-.", lw=1, label="old/old")
    ax.axhline(result["new_new"]["map"], color="black", ls="-.", lw=1, label="new/new")
    ax.set_xlabel("backfilled fraction")
    ax.set_ylabel(f"mAP@{result['k']}")
    ax.set_title(f"Backfill {result['old']} -> {result['new']} (N = {result['n']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(result, indent=2))
    (out / "curve.md").write_text(table(result))
    plot(result, out / "curve.png")
