"""The demo's outputs: curve.json, curve.png (live, offline and predicted curves) and the markdown table."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from devtools.demo import DemoResult


def write_outputs(result: DemoResult, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.summary()
    doc = {**asdict(result), **summary}
    (out / "curve.json").write_text(json.dumps(doc, indent=2))
    xs = [p.fraction for p in result.points]
    live = [p.live_map for p in result.points]
    predicted = [result.predicted_at(x) for x in xs]
    fig, (ax, gap) = plt.subplots(
        2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    ax.plot(xs, live, "o-", label="live, through /search")
    ax.plot(xs, [p.offline_map for p in result.points], "x--", label="offline harness, same items")
    if result.predicted:  # the pack's prediction for the chosen schedule, on its probe set
        pred = result.predicted
        fr = np.linspace(0, 1, len(pred["map"]))
        label = f"predicted before the rollout (probe set, old/old {pred['old_old']:.3f})"
        ax.plot(fr, pred["map"], ".:", color="tab:green", label=label)
    ax.axhline(result.old_old, color="grey", ls=":", label=f"old/old {result.old_old:.3f}")
    ax.axhline(result.new_new, color="black", ls=":", label=f"new/new {result.new_new:.3f}")
    ax.set_ylabel("mAP@100")
    ax.set_title(f"Live backfill {result.pair}: {result.mode} path, {result.policy} order, {result.items} items")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    if all(v is not None for v in predicted) and predicted:
        gap.axhspan(-0.02, 0.02, color="tab:green", alpha=0.12, label="within 0.02")
        gap.plot(xs, [lv - float(pv or 0.0) for lv, pv in zip(live, predicted, strict=True)], "o-", color="tab:green")
        gap.axhline(0.0, color="grey", lw=0.8)
        gap.set_ylabel("live - predicted")
        gap.legend(loc="lower right", fontsize=8)
    gap.set_xlabel("fraction backfilled")
    gap.grid(alpha=0.3)
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)
    (out / "curve.md").write_text(table(result))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(result: DemoResult) -> str:
    s = result.summary()
    lines = [
        "| fraction | done/total | path | live mAP@100 | offline mAP@100 | predicted mAP@100 | live top-1 | "
        "offline top-1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in result.points:
        lines.append(
            f"| {p.fraction:.3f} | {p.done}/{p.total} | {p.path} | {p.live_map:.4f} | {p.offline_map:.4f} | "
            f"{_fmt(result.predicted_at(p.fraction))} | {p.live_top1:.4f} | {p.offline_top1:.4f} |"
        )
    lines.append("")
    lines.append(
        f"old/old {result.old_old:.4f}, new/new {result.new_new:.4f}; live AUC {s['auc']:.4f}, relative gain "
        f"{s['relative_gain']:.3f}, largest negative flip {s['largest_negative_flip']:.4f}, lowest point vs "
        f"old/old {s['lowest_vs_old_old']:+.4f}, largest live-offline gap {s['max_live_offline_gap']:.4f}, "
        f"largest predicted-live gap {_fmt(s['max_predicted_live_gap'])}; "
        f"{result.seconds:.0f} s in all. Pair {result.pair}, path {result.mode} / {result.policy}: {result.path_reason}"
        + (
            f" Training phase (compat pack trained on the gallery): sample {result.training.get('sample')}, "
            f"{result.training.get('seconds')} s."
            if result.training
            else ""
        )
    )
    return "\n".join(lines) + "\n"
