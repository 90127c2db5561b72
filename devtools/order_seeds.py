"""The learned order against several random orders, per path, on the test split (issue 16's order check).

    python -m devtools.order_seeds --seeds 3 [--artifacts DIR --old A --new B] [--out runs/order-seeds]

For each single-pass path (reverse, re-scored; forward) it computes the harness curve (models/harness.py's
protocol: gallery = queries = the test split, leave-one-out, mAP@100, 22 points) of the `uncertainty`
order and of `--seeds` random orders (seeds 0..N-1), and prints relative gains: each random seed, their
mean and standard deviation, and uncertainty minus that mean. Writes order-seeds.{json,md} under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from models.data import load
from models.evaluate import build_evaluator, policy_order, summarize

PATHS = ("reverse", "forward")


def measure(artifacts: Path, old: str, new: str, seeds: int, dataset: str = "fashion-mnist") -> dict:
    x, y = load(dataset, "test")
    ev, sig = build_evaluator(x, y, artifacts, old, new)
    old_old, _ = ev.single("raw")
    new_new, _ = ev.single("new")
    rows = {}
    for mode in PATHS:
        t0 = time.monotonic()
        learned = summarize(
            ev.curve(policy_order("uncertainty", len(y), sigma=sig["sigma"]), mode)["map"], old_old, new_new
        )
        random = [
            summarize(ev.curve(policy_order("random", len(y), seed=s), mode)["map"], old_old, new_new)
            for s in range(seeds)
        ]
        gains = np.array([r["relative_gain"] for r in random])
        rows[mode] = {
            "uncertainty": learned,
            "random": random,
            "random_mean_gain": float(gains.mean()),
            "random_sd_gain": float(gains.std(ddof=1)) if seeds > 1 else 0.0,
            "uncertainty_minus_random": float(learned["relative_gain"] - gains.mean()),
            "seconds": round(time.monotonic() - t0, 1),
        }
    return {"pair": f"{artifacts}:{old}:{new}", "n": len(y), "old_old": old_old, "new_new": new_new, "paths": rows}


def table(result: dict) -> str:
    lines = [
        f"Order check, {result['pair']}, N = {result['n']} (test split), relative gain of the 22-point curve:",
        "",
        "| path | uncertainty | random seeds | random mean (sd) | uncertainty - random mean |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode, r in result["paths"].items():
        seeds = ", ".join(f"{x['relative_gain']:.3f}" for x in r["random"])
        lines.append(
            f"| {mode} | {r['uncertainty']['relative_gain']:.3f} | {seeds} | {r['random_mean_gain']:.3f} "
            f"({r['random_sd_gain']:.3f}) | {r['uncertainty_minus_random']:+.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--old", default="v1")
    p.add_argument("--new", default="v2")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("runs/order-seeds"))
    a = p.parse_args()
    result = measure(a.artifacts, a.old, a.new, a.seeds)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "order-seeds.json").write_text(json.dumps(result, indent=2))
    (a.out / "order-seeds.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
