"""`backfill train ...`: the training command line of `models/` (and `train gallery`, of `worker.train`).

`models` reads no settings of its own; this module resolves the defaults (artifacts folder, dataset folder)
from the service's settings and passes them in as arguments.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from service.config import REPO_ROOT, get_settings

if TYPE_CHECKING:
    from models.encoders import ConfigError
    from models.train import Recipe

T = TypeVar("T")

train_app = typer.Typer(help="Train the encoders and the compatibility pack (CPU, 2 threads).", no_args_is_help=True)

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


def _parse_classes(text: str) -> list[int]:
    """Parse "5,6,7" into [5, 6, 7]; a token that is not an integer is a clean --classes error (exit 2)."""
    out = []
    for token in (t.strip() for t in text.split(",")):
        try:
            out.append(int(token))
        except ValueError:
            raise typer.BadParameter(f"{token!r} is not an integer class id", param_hint="--classes") from None
    return out


def _config_error(e: ConfigError) -> typer.BadParameter:
    """An invalid recipe field as the option it came from ("name" is the argument): exit 2."""
    hint = "name" if e.field == "name" else "--" + e.field.replace("_", "-")
    return typer.BadParameter(e.message, param_hint=hint)


ENCODER_HELP = (
    "v1 (old: classes 0-4) or v2 (new: all classes) for the shipped recipes, with any option below "
    "overriding their field; any other name (letters, digits, _ . -) starts from v2's recipe on all classes."
)


@train_app.command("encoder")
def train_encoder_cmd(
    name: str = typer.Argument(..., help=ENCODER_HELP),
    out: Path = OUT_OPT,
    data_dir: Path | None = DATA_OPT,
    quick: bool = QUICK_OPT,
    threads: int = THREADS_OPT,
    arch: str | None = typer.Option(None, "--arch", help="cnn (default) or mixer (MLP-Mixer on 4x4 patches)."),
    classes: str | None = typer.Option(None, "--classes", help="Comma list of class ids 0-9 (default: all)."),
    width: int | None = typer.Option(None, "--width", help="cnn: first-block channels (v2: 16); mixer: channels (64)."),
    depth: int | None = typer.Option(None, "--depth", help="cnn: conv blocks, 1-4 (v2: 3); mixer: blocks (4)."),
    emb_dim: int | None = typer.Option(None, "--emb-dim", help="Embedding dimension (v1: 32, v2: 64)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Training epochs (v1: 4, v2: 5)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of init, batch order and augmentation (v2: 2)."),
    scale: float | None = typer.Option(None, "--scale", help="Cosine-classifier scale (16)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size (128)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate of one-cycle AdamW (0.003)."),
) -> None:
    """Train one encoder and write <out>/<name>/{model.pt,manifest.json} (the manifest records the recipe)."""
    from models.encoders import ConfigError
    from models.train import encoder_config, set_threads, train_encoders

    fields: dict[str, Any] = {
        "arch": arch,
        "width": width,
        "depth": depth,
        "emb_dim": emb_dim,
        "epochs": epochs,
        "seed": seed,
    }
    fields |= {"scale": scale, "batch_size": batch_size, "lr": lr}
    overrides = {k: v for k, v in fields.items() if v is not None}
    if classes is not None:
        overrides["classes"] = _parse_classes(classes)
    recipe = _recipe(quick)
    try:
        cfg = encoder_config(name, recipe, overrides)
    except ConfigError as e:
        raise _config_error(e) from e
    set_threads(threads)
    t0 = time.monotonic()
    try:
        paths = _dataset_guard(
            lambda: train_encoders(out, recipe, _data_dir(data_dir), which=(name,), configs={name: cfg})
        )
    except ConfigError as e:  # classes absent from the dataset
        raise _config_error(e) from e
    acc = _heldout_accuracy(paths[name])
    typer.echo(f"wrote {paths[name]} in {time.monotonic() - t0:.0f} s (heldout accuracy {acc:.4f})")


def _heldout_accuracy(directory: Path) -> float:
    import json

    return float(json.loads((directory / "manifest.json").read_text())["metrics"]["heldout_accuracy"])


@train_app.command("compat")
def train_compat_cmd(
    out: Path = OUT_OPT,
    old: str = typer.Option("v1", help="Old encoder name (under --out)."),
    new: str = typer.Option("v2", help="New encoder name (under --out)."),
    data_dir: Path | None = DATA_OPT,
    quick: bool = QUICK_OPT,
    threads: int = THREADS_OPT,
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Epochs of psi and of h+sigma (default 12)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the compat training (default 0)."),
) -> None:
    """Train psi, h, sigma and the calibration for two trained encoders; write <out>/compat-<old>-<new>/."""
    from dataclasses import replace

    from models.artifacts import ArtifactError
    from models.train import set_threads, train_compat_pack

    if old == new:
        raise typer.BadParameter("--old and --new name the same encoder", param_hint="--new")
    recipe = _recipe(quick)
    if epochs is not None:
        recipe.compat = replace(recipe.compat, epochs_psi=epochs, epochs_h=epochs)
    if seed is not None:
        recipe.compat = replace(recipe.compat, seed=seed)
    set_threads(threads)
    t0 = time.monotonic()
    try:
        path = _dataset_guard(lambda: train_compat_pack(out, recipe, _data_dir(data_dir), old, new))
    except ArtifactError as e:  # a missing encoder, or encoders trained on another dataset
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"wrote {path} in {time.monotonic() - t0:.0f} s")


@train_app.command("order")
def train_order_cmd(
    out: Path = OUT_OPT,
    old: str = typer.Option("v1", help="Old encoder name (under --out)."),
    new: str = typer.Option("v2", help="New encoder name (under --out)."),
    data_dir: Path | None = DATA_OPT,
    quick: bool = QUICK_OPT,
    threads: int = THREADS_OPT,
) -> None:
    """Fit the learned backfill order (predicted merge benefit, models/order.py) of an existing compat pack
    and re-predict its paths on the calibration split. `train compat` fits it itself."""
    from models.artifacts import ArtifactError
    from models.train import add_order, set_threads

    set_threads(threads)
    t0 = time.monotonic()
    try:
        pred = _dataset_guard(lambda: add_order(out, _recipe(quick), _data_dir(data_dir), old, new))
    except ArtifactError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    rows = [
        f"{p}: uncertainty {c['uncertainty']['relative_gain']:.3f}, random {c['random']['relative_gain']:.3f}"
        for p, c in pred["curves"].items()
        if p != "old-only"
    ]
    typer.echo("\n".join(rows))
    typer.echo(f"wrote {out / f'compat-{old}-{new}'} in {time.monotonic() - t0:.0f} s")


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


@train_app.command("gallery")
def train_gallery_cmd(
    old: str = typer.Option(..., "--old", help="The registered model the gallery is embedded with."),
    new: str = typer.Option(..., "--new", help="The registered model to upgrade to."),
    sample: int | None = typer.Option(None, "--sample", min=20, help="Items to embed and train on (default: setting)."),
    seed: int = typer.Option(0, help="Seed of the sample and the training."),
    threads: int = THREADS_OPT,
) -> None:
    """Train the pair's compat pack on a sample of the gallery in the database (label-free unless every sampled
    item has a label), write it under the artifacts folder and register it: what a rollout's `training`
    phase does, without a rollout."""
    from models.train import set_threads
    from service.registry import register_pack
    from worker import context
    from worker.train import fit_gallery_pack

    settings = get_settings()
    if sample is not None:
        settings = settings.model_copy(update={"train_sample": sample})
    set_threads(threads)
    ctx = context.configure(settings)
    with ctx.sessionmaker() as s:
        from service.db.models import ModelVersion

        missing = [m for m in (old, new) if s.get(ModelVersion, m) is None]
    if missing or old == new:
        typer.echo(f"error: {'same model twice' if old == new else 'not registered: ' + ', '.join(missing)}", err=True)
        raise typer.Exit(2)
    path, info = fit_gallery_pack(ctx, (old, new), seed)
    assert path is not None
    with ctx.sessionmaker() as s:
        register_pack(s, old, new, path)
        s.commit()
    from cli.evaluate import predictions_table
    from models.artifacts import load_compat

    typer.echo(predictions_table(load_compat(path).manifest["predictions"]))
    typer.echo(f"wrote and registered {path}: {info}")


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
