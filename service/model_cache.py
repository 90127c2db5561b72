"""The process's loaded encoders and compatibility packs: one cache, the same identity rule in the API
(`service.runtime`) and the worker (`worker.context`).

Identity. An artifact is what it is registered for (an encoder: its model name; a compat pack: its
(from, to) pair) at a checksum (`artifact_checksum`: the manifest's sha256, which itself records the sha256
of every weight file). The same name or pair at another checksum is another artifact: asking with the
newer row loads it and replaces the old one, so a compat pack re-registered for its pair reaches every
process that reads the row again. The path is not part of the identity: the same checksum in a moved
directory is the same weights, and is not loaded twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.artifacts import CompatPack, Encoder, load_compat, load_encoder
from service.config import REPO_ROOT
from service.db.models import CompatPack as CompatPackRow
from service.db.models import ModelVersion

log = logging.getLogger(__name__)

Pair = tuple[str, str]


@dataclass(frozen=True)
class EncoderRef:
    """Which encoder artifact a model name stands for now (a detached copy of its row's identity)."""

    name: str
    artifact_path: str
    checksum: str

    @classmethod
    def of(cls, row: ModelVersion) -> EncoderRef:
        return cls(row.name, row.artifact_path, row.checksum)


@dataclass(frozen=True)
class PackRef:
    """Which compat-pack artifact a (from, to) pair stands for now."""

    from_version: str
    to_version: str
    artifact_path: str
    checksum: str

    @property
    def pair(self) -> Pair:
        return (self.from_version, self.to_version)

    @classmethod
    def of(cls, row: CompatPackRow) -> PackRef:
        return cls(row.from_version, row.to_version, row.artifact_path, row.checksum)


def resolve_artifact(artifacts_dir: Path, artifact_path: str) -> Path:
    """A registered artifact path on this machine: absolute as is; a relative one under the artifacts
    directory, its parent, the repository or the working directory (the first that exists)."""
    p = Path(artifact_path)
    if p.is_absolute():
        return p
    for base in (artifacts_dir, artifacts_dir.parent, REPO_ROOT, Path.cwd()):
        if (base / p).exists():
            return base / p
    return artifacts_dir / p


class ModelCache:
    """Encoders by model name and compat packs by pair, each held at one checksum (see the module docstring).

    `device` is called on the first load only, so a worker never initialises CUDA before it forks.
    `on_encoder_load(name)` runs after an encoder is loaded (the worker exports its metric series then)."""

    def __init__(
        self,
        artifacts_dir: Path,
        device: Callable[[], str],
        on_encoder_load: Callable[[str], None] | None = None,
    ) -> None:
        self.artifacts_dir = artifacts_dir
        self._device = device
        self._on_encoder_load = on_encoder_load
        self._encoders: dict[str, tuple[str, Encoder]] = {}
        self._packs: dict[Pair, tuple[str, CompatPack]] = {}
        self._lock = threading.Lock()

    def encoder(self, ref: EncoderRef) -> Encoder:
        hit = self._encoders.get(ref.name)
        if hit is not None and hit[0] == ref.checksum:
            return hit[1]
        with self._lock:
            hit = self._encoders.get(ref.name)
            if hit is None or hit[0] != ref.checksum:
                device = self._device()
                log.info(
                    "loading encoder %s (%s) from %s on %s", ref.name, ref.checksum[:12], ref.artifact_path, device
                )
                hit = (ref.checksum, load_encoder(resolve_artifact(self.artifacts_dir, ref.artifact_path), device))
                self._encoders[ref.name] = hit
                if self._on_encoder_load is not None:
                    self._on_encoder_load(ref.name)
            return hit[1]

    def compat(self, ref: PackRef) -> CompatPack:
        hit = self._packs.get(ref.pair)
        if hit is not None and hit[0] == ref.checksum:
            return hit[1]
        with self._lock:
            hit = self._packs.get(ref.pair)
            if hit is None or hit[0] != ref.checksum:
                device = self._device()
                log.info("loading compat pack %s -> %s (%s) on %s", *ref.pair, ref.checksum[:12], device)
                hit = (ref.checksum, load_compat(resolve_artifact(self.artifacts_dir, ref.artifact_path), device))
                self._packs[ref.pair] = hit
            return hit[1]

    def loaded(self) -> dict[str, str]:
        """What is held now: `name` or `from->to` -> checksum (for logs and tests)."""
        out = {name: checksum for name, (checksum, _) in self._encoders.items()}
        out.update({f"{a}->{b}": checksum for (a, b), (checksum, _) in self._packs.items()})
        return out
