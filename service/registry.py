"""Register the artifacts of a directory as model versions and compatibility packs (idempotent).

A model whose name is already registered with another checksum is left alone and reported: its stored
embeddings were computed by the registered artifact, so silently swapping the file would mix spaces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.artifacts import ArtifactError, _read_manifest, artifact_checksum, discover
from service.db import queries
from service.db.models import CompatPack, ModelVersion
from service.errors import Conflict, InvalidRequest

log = logging.getLogger(__name__)


@dataclass
class RegisterResult:
    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)  # same checksum, moved directory
    conflicts: list[str] = field(default_factory=list)
    serving: str | None = None


def register_pack(session: Session, src: str, dst: str, directory: Path) -> str:
    """Add the pair's pack row, or point it at `directory` (a retrained pack for the same pair is safe to
    swap: it only maps vectors at query time). Returns "added", "updated" or "unchanged"; the caller commits."""
    checksum = artifact_checksum(directory)
    path = str(directory.resolve())
    pack = queries.compat_pack(session, src, dst)
    if pack is None:
        session.add(
            CompatPack(
                from_version=src,
                to_version=dst,
                artifact_path=path,
                checksum=checksum,
                manifest=_read_manifest(directory),
            )
        )
        return "added"
    if pack.checksum != checksum:
        pack.checksum = checksum
        pack.manifest = _read_manifest(directory)
    elif pack.artifact_path == path:
        return "unchanged"
    pack.artifact_path = path
    return "updated"


def _register_once(session: Session, artifacts_dir: Path, default_model: str | None) -> RegisterResult:
    res = RegisterResult()
    encoders, packs = discover(artifacts_dir)
    for name, directory in encoders.items():
        manifest = _read_manifest(directory)
        checksum = artifact_checksum(directory)
        row = session.get(ModelVersion, name)
        if row is None:
            session.add(
                ModelVersion(
                    name=name,
                    dim=int(manifest["dim"]),
                    artifact_path=str(directory.resolve()),
                    checksum=checksum,
                    status="registered",
                    manifest=manifest,
                )
            )
            res.added.append(name)
        elif row.checksum != checksum:
            res.conflicts.append(name)
            log.warning("model %s: %s differs from the registered artifact; not re-registered", name, directory)
        elif row.artifact_path != str(directory.resolve()):
            row.artifact_path = str(directory.resolve())
            res.updated.append(name)
        else:
            res.unchanged.append(name)
    session.flush()
    for (src, dst), directory in packs.items():
        label = f"compat-{src}-{dst}"
        if session.get(ModelVersion, src) is None or session.get(ModelVersion, dst) is None:
            log.warning("%s skipped: both models must be registered", label)
            continue
        getattr(res, register_pack(session, src, dst, directory)).append(label)
    session.flush()
    serving = queries.serving_model(session)
    if serving is None and default_model and session.get(ModelVersion, default_model) is not None:
        session.get(ModelVersion, default_model).status = "serving"  # type: ignore[union-attr]
        res.serving = default_model
    else:
        res.serving = serving.name if serving is not None else None
    session.commit()
    return res


def register_artifacts(session: Session, artifacts_dir: Path, default_model: str | None = None) -> RegisterResult:
    """Register every encoder and compat pack under `artifacts_dir`; make `default_model` serving when no
    model serves yet. Safe to run concurrently from several processes (a lost insert race is retried)."""
    try:
        return _register_once(session, artifacts_dir, default_model)
    except IntegrityError:
        session.rollback()
        return _register_once(session, artifacts_dir, default_model)
    except ArtifactError:
        session.rollback()
        raise


@dataclass(frozen=True)
class Catalog:
    """The registered model versions (oldest first) and compatibility packs."""

    models: list[ModelVersion]
    compat_packs: list[CompatPack]


def list_models(session: Session) -> Catalog:
    """Every model version and compat pack (the GET /models and `backfill models list` listing)."""
    return Catalog(queries.model_versions(session), queries.compat_packs(session))


def add_encoder(session: Session, artifacts_dir: Path, source: Path) -> ModelVersion:
    """Validate the encoder artifact in `source` (models/validate.py), place it at `<artifacts_dir>/<name>`
    unless it is there already, and register it (status `registered`). Idempotent for the same artifact;
    422 naming the problem for an invalid one, 409 for a name registered with another artifact. Nothing is
    registered or placed unless every check passes."""
    import shutil

    from models.validate import InvalidArtifact, check_encoder

    try:
        encoder = check_encoder(source)
    except InvalidArtifact as e:
        raise InvalidRequest("model", str(e)) from e
    checksum = artifact_checksum(source)
    row = session.get(ModelVersion, encoder.name)
    if row is not None:
        if row.checksum == checksum:
            return row
        raise Conflict("name", f"model {encoder.name!r} is registered with another artifact; pick a new name")
    target = (artifacts_dir / encoder.name).resolve()
    if source.resolve() != target:
        if target.exists():
            raise Conflict("name", f"{target.name} exists in the artifacts folder with other contents")
        shutil.copytree(source, target)
    row = ModelVersion(
        name=encoder.name,
        dim=encoder.dim,
        artifact_path=str(target),
        checksum=checksum,
        status="registered",
        manifest=encoder.manifest,
    )
    session.add(row)
    session.commit()
    return row
