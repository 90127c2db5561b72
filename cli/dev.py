"""`backfill demo` and `backfill bench`: development commands, defined in `devtools/`.

`devtools` is not part of the Docker image (it drives scratch databases, the dataset and the source tree's
artifacts); there, both commands exist and say how to run them from a source checkout.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

HOW = (
    "`{name}` is a development command: run it from a source checkout (`make venv`, then `.venv/bin/backfill {name}`)."
)


def _unavailable(name: str) -> Callable[[], None]:
    def command() -> None:
        typer.echo(HOW.format(name=name), err=True)
        raise typer.Exit(2)

    command.__doc__ = f"Development command (`{name}`): needs a source checkout."
    return command


def register(app: typer.Typer) -> None:
    try:
        from devtools import bench, demo
    except ModuleNotFoundError as e:
        if e.name != "devtools":
            raise
        for name in ("demo", "bench"):
            app.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(
                _unavailable(name)
            )
        return
    demo.register(app)
    bench.register(app)
