"""`backfill eval ...`: the offline evaluation harness (models/evaluate.py) and the path predictions of a
compat pack (models/paths.py), over the shipped pair or any pair the training CLI produced."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from cli.train import DATA_OPT, THREADS_OPT, _data_dir, _dataset_guard
from service.config import REPO_ROOT

eval_app = typer.Typer(help="Offline evaluation harness (backfill curves) and path predictions.", no_args_is_help=True)

ARTIFACTS_OPT = typer.Option(REPO_ROOT / "artifacts", "--artifacts", help="Artifacts directory.")
OLD_OPT = typer.Option("v1", help="Old encoder.")
NEW_OPT = typer.Option("v2", help="New encoder.")


@eval_app.command("curve")
def eval_curve_cmd(
    out: Path = typer.Option(REPO_ROOT / "runs" / "eval", "--out", help="Output folder (curve.json/png/md)."),
    artifacts: Path = ARTIFACTS_OPT,
    old: str = OLD_OPT,
    new: str = NEW_OPT,
    dataset: str = typer.Option("fashion-mnist", help="fashion-mnist (test split) or digits."),
    data_dir: Path | None = DATA_OPT,
    items: int = typer.Option(10_000, min=10, help="Gallery size (first N test images)."),
    seed: int = typer.Option(0, help="Seed of the random policy."),
    dense_points: int = typer.Option(3, min=0, help="Points timed with the dense n x n approach (0 = skip)."),
    threads: int = THREADS_OPT,
) -> None:
    """Backfill curves for every path x policy, the raw-merge baseline, old/old and new/new."""
    import torch

    from models import harness
    from models.data import load

    torch.set_num_threads(threads)
    x, y = _dataset_guard(lambda: load(dataset, "test", _data_dir(data_dir)))
    x, y = x[:items], y[:items]
    result = harness.run_harness(x, y, artifacts, out, old, new, seed=seed, dense_points=dense_points)
    typer.echo(harness.table(result))
    typer.echo(
        f"wrote {out / 'curve.json'}, {out / 'curve.png'}, {out / 'curve.md'} in {result['total_seconds']:.0f} s"
    )


@eval_app.command("predict")
def eval_predict_cmd(
    artifacts: Path = ARTIFACTS_OPT,
    old: str = OLD_OPT,
    new: str = NEW_OPT,
    dataset: str = typer.Option("fashion-mnist", help="fashion-mnist or digits (training split)."),
    data_dir: Path | None = DATA_OPT,
    probe: int = typer.Option(5000, min=50, help="Probe set: the last N images of the training split."),
    threads: int = THREADS_OPT,
) -> None:
    """Fit the two-pass calibration if missing and write every path's predicted curve on the probe set (the
    calibration split: training data, never the test split) into the compat pack's manifest."""
    import torch

    from models.data import load
    from models.paths import annotate_pack

    torch.set_num_threads(threads)
    pack_dir = artifacts / f"compat-{old}-{new}"
    if not (pack_dir / "manifest.json").is_file():
        typer.echo(f"no compat pack at {pack_dir}", err=True)
        raise typer.Exit(2)
    x, y = _dataset_guard(lambda: load(dataset, "train", _data_dir(data_dir)))
    t0 = time.monotonic()
    desc = {"dataset": dataset, "split": "train", "rows": f"last {probe}"}
    pred = annotate_pack(pack_dir, artifacts / old, artifacts / new, x[-probe:], y[-probe:], desc)
    typer.echo(predictions_table(pred))
    typer.echo(f"wrote the predictions into {pack_dir / 'manifest.json'} in {time.monotonic() - t0:.0f} s")


def predictions_table(pred: dict[str, Any]) -> str:
    import numpy as np

    from models.paths import choose

    auto = choose(pred)
    lines = [
        f"Predicted on the probe set ({pred['probe']}): old/old {pred['old_old']:.4f}, new/new {pred['new_new']:.4f}",
        "",
        "| path | order | AUC | sd of AUC over random seeds | relative gain | lowest vs old/old (at fraction) | "
        "largest flip |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path, by_order in pred["curves"].items():
        for order, c in by_order.items():
            mark = " **auto**" if (path, order) == (auto.mode, auto.policy) else ""
            seeds = c.get("seeds") or []
            sd = f"{float(np.std([np.mean(v) for v in seeds], ddof=1)):.5f} ({len(seeds)})" if len(seeds) > 1 else "-"
            lines.append(
                f"| {path}{mark} | {order} | {c['auc']:.4f} | {sd} | {c['relative_gain']:.3f} | "
                f"{c['worst_margin']:+.4f} ({c['worst_fraction']:.2f}) | {c['largest_negative_flip']:.4f} |"
            )
    lines += ["", f"auto: {auto.mode} / {auto.policy} ({auto.reason})"]
    return "\n".join(lines)


@eval_app.command("pairs")
def eval_pairs_cmd(
    pairs: list[str] = typer.Argument(..., help="DIR:OLD:NEW per pair (an artifacts folder and two encoders)."),
    out: Path = typer.Option(REPO_ROOT / "runs" / "pairs-eval", "--out", help="Output folder."),
    dataset: str = typer.Option("fashion-mnist", help="fashion-mnist (test split) or digits."),
    data_dir: Path | None = DATA_OPT,
    items: int = typer.Option(10_000, min=10, help="Gallery size (test images from --offset)."),
    offset: int = typer.Option(0, min=0, help="First test image of the gallery."),
    seed: int = typer.Option(0, help="Seed of the random policy."),
    threads: int = THREADS_OPT,
) -> None:
    """The harness over several pairs: every path x policy on the test split, plus the path `auto` takes
    from each pack's predictions. Writes pairs.json and pairs.md."""
    import torch

    from models import harness
    from models.data import load

    torch.set_num_threads(threads)
    x, y = _dataset_guard(lambda: load(dataset, "test", _data_dir(data_dir)))
    x, y = x[offset : offset + items], y[offset : offset + items]
    parsed = []
    for spec in pairs:
        parts = spec.split(":")
        if len(parts) != 3 or not all(parts):
            raise typer.BadParameter(f"{spec!r}: expected DIR:OLD:NEW", param_hint="pairs")
        parsed.append((Path(parts[0]), parts[1], parts[2]))
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for art, old, new in parsed:
        result = harness.run_harness(x, y, art, out / f"{art.name}-{old}-{new}", old, new, seed=seed, dense_points=0)
        manifest = json.loads((art / f"compat-{old}-{new}" / "manifest.json").read_text())
        rows.append({"pair": f"{art.name}: {old}->{new}", "result": result, "predictions": manifest.get("predictions")})
    (out / "pairs.json").write_text(json.dumps(rows, indent=1, default=float))
    text = pairs_table(rows) + "\n" + order_table(rows)
    (out / "pairs.md").write_text(text)
    typer.echo(text)


def pairs_table(rows: list[dict[str, Any]]) -> str:
    """Every harness curve per pair, and the curve `auto` takes: the chosen path's (spliced at the switch
    when the schedule has one; the harness orders are the same for every path, so the splice is exact)."""
    lines = [
        "| pair | path / order | old/old | new/new | AUC | relative gain | lowest vs old/old | largest flip |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        r = row["result"]
        oo, nn_ = r["old_old"]["map"], r["new_new"]["map"]
        for c in r["curves"]:
            lines.append(_row(row["pair"], c["name"], c["map"], oo, nn_))
        values, label = auto_curve(r, row["predictions"])
        lines.append(_row(row["pair"], f"**auto: {label}**", values, oo, nn_))
    return "\n".join(lines) + "\n"


def order_table(rows: list[dict[str, Any]]) -> str:
    """Per pair and merging path: `auto`'s order test on the probe set (models.paths.order_test over the
    predictions' random seeds) beside both orders' relative gain on the harness's gallery."""
    import numpy as np

    from models.paths import ORDER_Z, order_test

    lines = [
        "| pair | path | probe: uncertainty gain | probe: random gain, mean (sd of one order, seeds) | z | "
        f"order (z > {ORDER_Z:g}) | gallery: uncertainty gain | gallery: random gain |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        pred = row["predictions"] or {}
        gain = {(c["mode"], c["policy"]): c["relative_gain"] for c in row["result"]["curves"]}
        for path, by_order in (pred.get("curves") or {}).items():
            seeds = by_order["random"].get("seeds") or []
            t = order_test(float(by_order["uncertainty"]["auc"]), [float(np.mean(v)) for v in seeds])
            if path == "old-only" or t is None:
                continue
            span = float(pred["new_new"]) - float(pred["old_old"])
            rel = (t["random_mean"] - float(pred["old_old"])) / span
            lines.append(
                f"| {row['pair']} | {path} | {by_order['uncertainty']['relative_gain']:.3f} | {rel:.3f} "
                f"({t['random_sd'] / span:.4f}, {t['seeds']}) | {t['z']:+.2f} | "
                f"{'uncertainty' if t['z'] > ORDER_Z else 'random'} | {gain[(path, 'uncertainty')]:.3f} | "
                f"{gain[(path, 'random')]:.3f} |"
            )
    return "\n".join(lines) + "\n"


def auto_curve(result: dict[str, Any], predictions: dict[str, Any] | None) -> tuple[list[float], str]:
    """The harness curve of the path schedule `auto` chooses from the pack's predictions."""
    from models.paths import choose, schedule_paths

    auto = choose(predictions)
    schedule = (auto.predicted or {}).get("schedule") or [[0.0, auto.mode]]
    policy = auto.policy if auto.policy != "fifo" else "random"
    oo = result["old_old"]["map"]
    curves = {(c["mode"], c["policy"]): c["map"] for c in result["curves"]}
    at = schedule_paths(schedule, len(result["fractions"]))
    values = [oo if path == "old-only" else curves[(path, policy)][i] for i, path in enumerate(at)]
    label = " then ".join(f"{p} from {float(start):.2f}" for start, p in schedule) + f" / {policy}"
    return values, label


def _row(pair: str, name: str, values: list[float], old_old: float, new_new: float) -> str:
    from models.evaluate import summarize

    s = summarize(values, old_old, new_new)
    return (
        f"| {pair} | {name} | {old_old:.4f} | {new_new:.4f} | {s['auc']:.4f} | {s['relative_gain']:.3f} | "
        f"{min(values) - old_old:+.4f} | {s['largest_negative_flip']:.4f} |"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
