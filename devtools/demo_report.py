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
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [p.live_map for p in result.points], "o-", label="live, through /search")
    ax.plot(xs, [p.offline_map for p in result.points], "x--", label="offline harness, same items")
    if result.predicted:  # on the pack's probe set: compare shapes relative to old/old and new/new there
        pred = result.predicted
        fr = np.linspace(0, 1, len(pred["map"]))
        ax.plot(fr, pred["map"], ".:", color="tab:green", label=f"predicted (probe set, old/old {pred['old_old']:.3f})")
    ax.axhline(result.old_old, color="grey", ls=":", label=f"old/old {result.old_old:.3f}")
    ax.axhline(result.new_new, color="black", ls=":", label=f"new/new {result.new_new:.3f}")
    ax.set_xlabel("fraction backfilled")
    ax.set_ylabel("mAP@100")
    ax.set_title(f"Live backfill {result.pair}: {result.mode} path, {result.policy} order, {result.items} items")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)
    (out / "curve.md").write_text(table(result))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(result: DemoResult) -> str:
    s = result.summary()
    lines = [
        "| fraction | done/total | path | live mAP@100 | offline mAP@100 | live top-1 | offline top-1 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in result.points:
        lines.append(
            f"| {p.fraction:.3f} | {p.done}/{p.total} | {p.path} | {p.live_map:.4f} | {p.offline_map:.4f} | "
            f"{p.live_top1:.4f} | {p.offline_top1:.4f} |"
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
