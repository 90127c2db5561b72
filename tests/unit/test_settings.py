"""Settings: defaults need nothing external; bad values give errors that name the variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings


def test_embedded_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for var in ("BACKFILL_DATABASE_URL", "BACKFILL_REDIS_URL", "BACKFILL_ENVIRONMENT"):
        monkeypatch.delenv(var, raising=False)
    s = Settings(data_dir=tmp_path)
    assert s.sqlalchemy_url == f"sqlite:///{tmp_path / 'backfill.sqlite3'}"
    assert s.is_sqlite and s.redis_url is None


@pytest.mark.parametrize(
    ("var", "value", "field"),
    [
        ("BACKFILL_MAX_K", "zero", "max_k"),
        ("BACKFILL_MAX_K", "0", "max_k"),
        ("BACKFILL_DATABASE_URL", "mysql://x", "database_url"),
        ("BACKFILL_REDIS_URL", "http://x", "redis_url"),
        ("BACKFILL_LOG_LEVEL", "loud", "log_level"),
        ("BACKFILL_LEASE_SECONDS", "-1", "lease_seconds"),
        ("BACKFILL_ENVIRONMENT", "staging", "environment"),
        ("BACKFILL_INDEX_SEARCH_PARAMS", "nprobe=many", "index_search_params"),
        ("BACKFILL_INDEX_BACKEND", "qdrant", "index_backend"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str, field: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert field in str(exc.value)


def test_env_values_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKFILL_MAX_K", "7")
    monkeypatch.setenv("BACKFILL_DATABASE_URL", "postgresql://u@h/db")
    s = Settings()
    assert s.max_k == 7
    assert s.sqlalchemy_url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize("token", [None, "changeme", "short-token"])
def test_production_refuses_weak_token(monkeypatch: pytest.MonkeyPatch, token: str | None) -> None:
    monkeypatch.setenv("BACKFILL_ENVIRONMENT", "production")
    if token is None:
        monkeypatch.delenv("BACKFILL_OPERATOR_TOKEN", raising=False)
    else:
        monkeypatch.setenv("BACKFILL_OPERATOR_TOKEN", token)
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert "BACKFILL_OPERATOR_TOKEN" in str(exc.value)


def test_production_accepts_strong_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKFILL_ENVIRONMENT", "production")
    monkeypatch.setenv("BACKFILL_OPERATOR_TOKEN", "x" * 32)
    assert Settings().operator_token.get_secret_value() == "x" * 32


def test_token_not_in_repr() -> None:
    s = Settings(operator_token="a-very-secret-operator-token")  # type: ignore[arg-type]
    assert "a-very-secret-operator-token" not in repr(s)
