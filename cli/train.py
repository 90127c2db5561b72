"""`backfill train ...` and `backfill eval ...`: the command line of `models/`.

`models` reads no settings of its own; this module resolves the defaults (artifacts folder, dataset folder)
from the service's settings and passes them in as arguments.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer

from service.config import REPO_ROOT, get_settings

if TYPE_CHECKING:
    from models.train import Recipe

T = TypeVar("T")

train_app = typer.Typer(help="Train the encoders and the compatibility pack (CPU, 2 threads).", no_args_is_help=True)
eval_app = typer.Typer(help="Offline evaluation harness (backfill curves).", no_args_is_help=True)

OUT_OPT = typer.Option(REPO_ROOT / "artifacts", "--out", help="Artifacts directory.")
DATA_OPT = typer.Option(None, "--data-dir", help="Fashion-MNIST directory (default: BACKFILL_FASHION_MNIST_DIR).")
QUICK_OPT = typer.Option(False, "--quick", help="Tiny models on sklearn digits (seconds; for smoke tests).")
THREADS_OPT = typer.Option(2, "--threads", min=1, help="torch / faiss threads.")


def _recipe(quick: bool) -> Recipe:
    from models.train import Recipe

    return Recipe.quick() if quick else Recipe()


def _data_dir(data_dir: Path | None) -> Path:
    return data_dir if data_dir is not None else Path(get_settings().fashion_mnist_dir)


def _dataset_guard(fn: Callable[[], T]) -> T:
    from models.data import DatasetMissing

    try:
        return fn()
    except DatasetMissing as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from e


@train_app.command("encoder")
def train_encoder_cmd(
    name: str = typer.Argument(..., help="v1 (old: classes 0-4) or v2 (new: all classes)."),
    out: Path = OUT_OPT,
    data_dir: Path | None = DATA_OPT,
    quick: bool = QUICK_OPT,
    threads: int = THREADS_OPT,
) -> None:
    """Train one encoder and write <out>/<name>/{model.pt,manifest.json}."""
    from models.train import set_threads, train_encoders

    if name not in {"v1", "v2"}:
        raise typer.BadParameter("name must be v1 or v2", param_hint="name")
    set_threads(threads)
    t0 = time.monotonic()
    paths = _dataset_guard(lambda: train_encoders(out, _recipe(quick), _data_dir(data_dir), which=(name,)))
    typer.echo(f"wrote {paths[name]} in {time.monotonic() - t0:.0f} s")


@train_app.command("compat")
def train_compat_cmd(
    out: Path = OUT_OPT,
    old: str = typer.Option("v1", help="Old encoder name (under --out)."),
    new: str = typer.Option("v2", help="New encoder name (under --out)."),
    data_dir: Path | None = DATA_OPT,
    quick: bool = QUICK_OPT,
    threads: int = THREADS_OPT,
) -> None:
    """Train psi, h, sigma and the calibration for two trained encoders; write <out>/compat-<old>-<new>/."""
    from models.train import set_threads, train_compat_pack

    set_threads(threads)
    t0 = time.monotonic()
    path = _dataset_guard(lambda: train_compat_pack(out, _recipe(quick), _data_dir(data_dir), old, new))
    typer.echo(f"wrote {path} in {time.monotonic() - t0:.0f} s")


@train_app.command("all")
def train_all_cmd(
    out: Path = OUT_OPT, data_dir: Path | None = DATA_OPT, quick: bool = QUICK_OPT, threads: int = THREADS_OPT
) -> None:
    """Retrain v1, v2 and compat-v1-v2 (the shipped artifacts; about 5-10 minutes on 2 cores)."""
    from models.train import set_threads, train_all

    set_threads(threads)
    r = _dataset_guard(lambda: train_all(out, _recipe(quick), _data_dir(data_dir)))
    for p in r["paths"].values():
        typer.echo(f"wrote {p}")
    typer.echo(f"encoders {r['encoder_seconds']:.0f} s, compat {r['compat_seconds']:.0f} s, total {r['seconds']:.0f} s")


@eval_app.command("curve")
def eval_curve_cmd(
    out: Path = typer.Option(REPO_ROOT / "runs" / "eval", "--out", help="Output folder (curve.json/png/md)."),
    artifacts: Path = typer.Option(REPO_ROOT / "artifacts", "--artifacts", help="Artifacts directory."),
    old: str = typer.Option("v1", help="Old encoder."),
    new: str = typer.Option("v2", help="New encoder."),
    dataset: str = typer.Option("fashion-mnist", help="fashion-mnist (test split) or digits."),
    data_dir: Path | None = DATA_OPT,
    items: int = typer.Option(10_000, min=10, help="Gallery size (first N test images)."),
    seed: int = typer.Option(0, help="Seed of the random policy."),
    dense_points: int = typer.Option(3, min=0, help="Points timed with the dense n x n approach (0 = skip)."),
    threads: int = THREADS_OPT,
) -> None:
    """Backfill curves for every mode x policy, the raw-merge baseline, old/old and new/new."""
    import torch

    from models import evaluate
    from models.data import load

    torch.set_num_threads(threads)
    x, y = _dataset_guard(lambda: load(dataset, "test", _data_dir(data_dir)))
    x, y = x[:items], y[:items]
    result = evaluate.run_harness(x, y, artifacts, out, old, new, seed=seed, dense_points=dense_points)
    typer.echo(evaluate.table(result))
    typer.echo(
        f"wrote {out / 'curve.json'}, {out / 'curve.png'}, {out / 'curve.md'} in {result['total_seconds']:.0f} s"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
    app.add_typer(eval_app, name="eval")
