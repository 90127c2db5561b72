"""`backfill serve`, `backfill models register|add|list`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from service.config import Settings, check_startup, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

models_app = typer.Typer(help="Model versions and compatibility packs.", no_args_is_help=True)


def serve(
    host: str = typer.Option("127.0.0.1", help="Bind address."),
    port: int = typer.Option(8000, help="Port."),
    workers: int = typer.Option(1, min=1, help="uvicorn worker processes."),
) -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    from service.redis_conn import redis_url, stop_embedded

    settings = get_settings()
    check_startup(settings)  # a missing artifacts folder or a bad index factory stops here, in one line
    # Before the workers fork: start the embedded Redis (exports its URL to them) and migrate SQLite
    # once, rather than racing migrations in every worker.
    redis_url(settings)
    if settings.is_sqlite:
        from service.db.migrate import upgrade_head

        upgrade_head(settings)
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="backfill-prom-")
    try:
        uvicorn.run(
            "service.api.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=settings.log_level.lower(),
        )
    finally:
        stop_embedded()  # a clean stop; on a signal the embedded Redis dies with this process anyway


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    """A session on the configured database (migrated to head first on SQLite), disposed afterwards."""
    from service.db import make_engine, make_sessionmaker

    if settings.is_sqlite:
        from service.db.migrate import upgrade_head

        upgrade_head(settings)
    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as s:
            yield s
    finally:
        engine.dispose()


@models_app.command("register")
def models_register(directory: Path = typer.Argument(..., exists=True, file_okay=False)) -> None:
    """Register the encoders and compat packs found in DIRECTORY, the artifacts folder (idempotent)."""
    from models.artifacts import discover
    from service.registry import register_artifacts

    if (directory / "manifest.json").is_file():
        typer.echo(
            f"{directory} is one artifact (it holds manifest.json): pass the folder that contains it, "
            f"e.g. `backfill models register {directory.parent}`",
            err=True,
        )
        raise typer.Exit(2)
    encoders, packs = discover(directory)
    if not encoders and not packs:
        typer.echo(f"no encoders or compat packs under {directory} (each is a folder with manifest.json)", err=True)
        raise typer.Exit(2)
    settings = get_settings()
    with _session(settings) as s:
        res = register_artifacts(s, directory, settings.default_model)
    typer.echo(f"added: {', '.join(res.added) or '-'}")
    typer.echo(f"unchanged: {', '.join(res.unchanged) or '-'}")
    if res.updated:
        typer.echo(f"updated: {', '.join(res.updated)}")
    if res.conflicts:
        typer.echo(f"conflicts (checksum differs, left alone): {', '.join(res.conflicts)}", err=True)
    typer.echo(f"serving: {res.serving or '-'}")
    if res.conflicts:
        raise typer.Exit(1)


@models_app.command("add")
def models_add(
    path: Path = typer.Argument(..., exists=True, file_okay=False, help="One encoder artifact folder."),
) -> None:
    """Validate one encoder artifact (it loads; a probe batch gives the declared shape, finite, normalised and
    deterministic outputs), copy it into the artifacts folder and register it. Exit 2 naming the problem."""
    from service.errors import DomainError
    from service.registry import add_encoder

    settings = get_settings()
    try:
        with _session(settings) as s:
            row = add_encoder(s, Path(settings.artifacts_dir), path)
    except DomainError as e:
        typer.echo(f"refused: {e.problem}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"registered {row.name} (dim {row.dim}, {row.status}) from {row.artifact_path}")


@models_app.command("export-onnx")
def models_export_onnx(
    source: Path = typer.Argument(..., exists=True, file_okay=False, help="A TorchScript encoder artifact folder."),
    out: Path = typer.Argument(..., help="The folder to write the ONNX artifact to."),
    name: str = typer.Option(None, help="The exported model's name (default: the source's)."),
) -> None:
    """Write a TorchScript encoder as an ONNX artifact (same input spec; needs the `onnx` extra). Register it
    with `backfill models add OUT`."""
    from models.artifacts import export_onnx, load_encoder
    from models.validate import probe_batch

    export_onnx(source, out, name=name)
    a, b = load_encoder(source), load_encoder(out)
    gap = float(abs(a.embed(probe_batch(a.spec)) - b.embed(probe_batch(b.spec))).max())
    typer.echo(
        f"wrote {out} ({b.name}, onnx, dim {b.dim}); largest difference from TorchScript on a probe batch: {gap:.2e}"
    )


@models_app.command("list")
def models_list() -> None:
    """List model versions and compat packs."""
    from service.db import make_engine, make_sessionmaker
    from service.registry import list_models

    settings = get_settings()
    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as s:
            data = list_models(s)
    finally:
        engine.dispose()
    typer.echo(f"{'model':<12}{'dim':>6}  {'status':<12}path")
    for m in data.models:
        typer.echo(f"{m.name!s:<12}{m.dim!s:>6}  {m.status!s:<12}{m.artifact_path}")
    for p in data.compat_packs:
        typer.echo(f"compat {p.from_version} -> {p.to_version}  {p.artifact_path}")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(models_app, name="models")
