"""Every bad setting stops the process with one line naming the variable, its value and what is expected
(no traceback); list settings take comma-separated values; `--help` shows no type for on/off flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command

from cli.main import app
from service.config import Settings

BACKFILL = str(Path(sys.executable).with_name("backfill"))


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
    return subprocess.run([BACKFILL, *args], env={**clean, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("command", "var", "value", "expected"),
    [
        (["status"], "BACKFILL_MAX_K", "zero", "valid integer"),
        (["status"], "BACKFILL_MAX_K", "0", "greater than or equal to 1"),
        (["status"], "BACKFILL_LOG_LEVEL", "loud", "one of DEBUG"),
        (["status"], "BACKFILL_DATABASE_URL", "mysql://x", "postgresql+psycopg://"),
        (["status"], "BACKFILL_CORS_ORIGINS", "[not json", "comma-separated list or a JSON list"),
        (["serve"], "BACKFILL_INDEX_FACTORY", "Bogus", "FAISS cannot build it"),
        (["worker"], "BACKFILL_INDEX_FACTORY", "IVF,Nonsense", "FAISS cannot build it"),
        (["serve"], "BACKFILL_ARTIFACTS_DIR", "/nonexistent/artifacts", "no such directory"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(command: list[str], var: str, value: str, expected: str) -> None:
    r = run(command, **{var: value})
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"configuration error: {var}={value!r}: ") and expected in lines[0], lines[0]


def test_the_production_token_error_names_it_and_never_echoes_it() -> None:
    r = run(["status"], BACKFILL_ENVIRONMENT="production", BACKFILL_OPERATOR_TOKEN="short-secret")
    assert r.returncode == 2 and "BACKFILL_OPERATOR_TOKEN" in r.stderr and "short-secret" not in r.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [("key1", ["key1"]), ("key1, key2,", ["key1", "key2"]), ('["a,b", "c"]', ["a,b", "c"]), ("", [])],
)
def test_list_settings_take_comma_separated_values(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("BACKFILL_API_KEYS", value)
    monkeypatch.setenv("BACKFILL_CORS_ORIGINS", value)
    s = Settings()
    assert s.api_keys == expected and s.cors_origins == expected


def test_metrics_bind_defaults_to_loopback_outside_a_container(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.config as config

    monkeypatch.setattr(config, "_in_container", lambda: False)
    assert Settings().metrics_bind == "127.0.0.1"
    monkeypatch.setattr(config, "_in_container", lambda: True)
    assert Settings().metrics_bind == "0.0.0.0"
    assert Settings(metrics_host="10.0.0.5").metrics_bind == "10.0.0.5"


def _commands(group, path=()):  # type: ignore[no-untyped-def]
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name)


def test_help_shows_no_type_for_flags() -> None:
    """typer's rich help printed "<bool>" beside every on/off flag."""
    from typer.testing import CliRunner

    paths = list(_commands(get_command(app)))
    assert ("items", "add") in paths and ("rollout", "retry-failed") in paths
    runner = CliRunner()
    for path in paths:
        out = runner.invoke(app, [*path, "--help"], terminal_width=100)
        assert out.exit_code == 0, (path, out.output)
        assert "<bool>" not in out.output, (path, out.output)
    assert "--watch" in runner.invoke(app, ["status", "--help"]).output
