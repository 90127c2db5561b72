"""The `backfill` command is assembled from the explicit list in cli/main.py."""

from __future__ import annotations

import subprocess
import sys

import typer
from typer.main import get_command

from cli import main

EXPECTED = {
    "db",
    "serve",
    "models",
    "train",
    "eval",
    "worker",
    "upgrade",
    "status",
    "rollout",
    "items",
    "demo",
    "bench",
}


def test_every_command_module_is_listed_and_registered() -> None:
    group = get_command(main.app)
    assert isinstance(group, typer.core.TyperGroup)
    assert set(group.commands) == EXPECTED
    for module in main.COMMANDS:
        assert callable(module.register), module.__name__


def test_dev_commands_say_so_without_devtools() -> None:
    """In the image devtools/ is absent: `backfill bench` must exist and say how to run it, exit 2."""
    code = "import sys; sys.modules['devtools'] = None; from cli.main import app; app(['bench', '--quick'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "development command" in r.stderr and "source checkout" in r.stderr
