"""Artifacts: TorchScript modules plus a JSON manifest, so serving loads files, never training classes.

Layout under an artifacts directory::

    <name>/manifest.json       {"kind": "encoder", "name", "dim", "input", "config", "data_fingerprint",
    <name>/model.pt             "checksum", "metrics"}; model.pt maps (B, 1, 28, 28) float in [0, 1]
                                to (B, dim) L2-normalised float32 embeddings.
    compat-<old>-<new>/manifest.json   {"kind": "compat", "from", "to", "from_dim", "to_dim",
    compat-<old>-<new>/psi.pt           "calibration": {"reverse": {"x": [...], "y": [...]}, "forward": ...},
    compat-<old>-<new>/h.pt             "checksum", "metrics"}; psi: new -> old space, h: old -> new space,
    compat-<old>-<new>/sigma.pt         sigma: old vector -> (B,) uncertainty (higher = backfill earlier).

Distances everywhere are squared L2 between L2-normalised vectors (what faiss.IndexFlatL2 returns).
`calibration[mode]` is a monotone piecewise-linear map (knots x -> y, `np.interp`) from the OLD side's
distances onto the NEW side's scale, fitted on training data only; absent = identity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ENCODER_FILE = "model.pt"
COMPAT_FILES = ("psi.pt", "h.pt", "sigma.pt")
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """A missing, malformed or tampered artifact."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} not found")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: invalid JSON ({e})") from e
    return data


def _load_script(path: Path, expected_sha: str | None, device: str) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise ArtifactError(f"{path} not found")
    if expected_sha is not None and sha256_file(path) != expected_sha:
        raise ArtifactError(f"{path}: checksum mismatch")
    module = torch.jit.load(str(path), map_location=device)
    module.eval()
    return module


def pick_device(use_gpu: bool = True) -> str:
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def _to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 or float in [0, 1], or (N, 1, 28, 28) -> (N, 1, 28, 28) float32."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        a = np.asarray(images)
        x = torch.from_numpy(a if a.flags.writeable else a.copy())  # torch warns on read-only arrays
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    x = x.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected (N, 28, 28) or (N, 1, 28, 28) images, got {tuple(x.shape)}")
    return x


@dataclass
class Encoder:
    """A loaded embedding model."""

    name: str
    dim: int
    module: torch.jit.ScriptModule
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    device: str = "cpu"

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 1024) -> np.ndarray:
        """Images (N, 28, 28) uint8 / [0, 1] floats, or (N, 1, 28, 28) -> (N, dim) float32."""
        x = _to_input(images)
        out = [
            self.module(x[i : i + batch_size].to(self.device)).float().cpu() for i in range(0, x.shape[0], batch_size)
        ]
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(torch.cat(out).numpy(), dtype=np.float32)


def _apply(module: torch.jit.ScriptModule, v: np.ndarray, device: str) -> np.ndarray:
    with torch.no_grad():
        t = torch.as_tensor(np.ascontiguousarray(v, dtype=np.float32)).to(device)
        return np.ascontiguousarray(module(t).float().cpu().numpy(), dtype=np.float32)


def apply_calibration(knots: dict[str, list[float]] | None, distances: np.ndarray) -> np.ndarray:
    """A calibration's piecewise-linear map (knots x -> y) over distances; identity without knots."""
    d = np.asarray(distances, dtype=np.float32)
    if not knots:
        return d
    return np.interp(d, np.asarray(knots["x"]), np.asarray(knots["y"])).astype(np.float32)


@dataclass
class CompatPack:
    """The compatibility transformations between an old and a new model."""

    from_name: str
    to_name: str
    from_dim: int
    to_dim: int
    psi: torch.jit.ScriptModule
    h: torch.jit.ScriptModule
    sigma: torch.jit.ScriptModule
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    device: str = "cpu"

    def reverse(self, new_vecs: np.ndarray) -> np.ndarray:
        """psi: new-model vectors (N, to_dim) -> old space (N, from_dim)."""
        return _apply(self.psi, new_vecs, self.device)

    def forward(self, old_vecs: np.ndarray) -> np.ndarray:
        """h: old-model vectors (N, from_dim) -> new space (N, to_dim)."""
        return _apply(self.h, old_vecs, self.device)

    def uncertainty(self, old_vecs: np.ndarray) -> np.ndarray:
        """sigma: (N, from_dim) old vectors -> (N,) uncertainty; higher = backfill earlier."""
        return _apply(self.sigma, old_vecs, self.device).reshape(-1)

    def calibrate(self, mode: str, distances: np.ndarray) -> np.ndarray:
        """Map OLD-side distances of `mode` onto the NEW side's scale (identity when not fitted)."""
        return apply_calibration((self.manifest.get("calibration") or {}).get(mode), distances)


def save_encoder(module: torch.nn.Module, directory: Path, manifest: dict[str, Any]) -> Path:
    """Script `module`, write it and its manifest (with checksum) to `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module.eval())
    torch.jit.save(scripted, str(directory / ENCODER_FILE))
    manifest = {**manifest, "kind": "encoder", "checksum": sha256_file(directory / ENCODER_FILE)}
    for key in ("name", "dim"):
        if key not in manifest:
            raise ArtifactError(f"encoder manifest needs {key!r}")
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return directory


def save_compat(
    psi: torch.nn.Module, h: torch.nn.Module, sigma: torch.nn.Module, directory: Path, manifest: dict[str, Any]
) -> Path:
    """Script and write psi, h, sigma and the manifest (with per-file checksums)."""
    directory.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for name, module in zip(COMPAT_FILES, (psi, h, sigma), strict=True):
        scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module.eval())
        torch.jit.save(scripted, str(directory / name))
        checksums[name] = sha256_file(directory / name)
    for key in ("from", "to", "from_dim", "to_dim"):
        if key not in manifest:
            raise ArtifactError(f"compat manifest needs {key!r}")
    manifest = {**manifest, "kind": "compat", "checksum": checksums}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return directory


def update_manifest(directory: Path, **fields: Any) -> None:
    """Replace top-level manifest fields (predictions, calibration) of an artifact; its files are unchanged."""
    manifest = {**_read_manifest(directory), **fields}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def load_encoder(directory: Path, device: str = "cpu") -> Encoder:
    m = _read_manifest(directory)
    if m.get("kind") != "encoder":
        raise ArtifactError(f"{directory}: not an encoder artifact")
    module = _load_script(directory / ENCODER_FILE, m.get("checksum"), device)
    return Encoder(name=m["name"], dim=int(m["dim"]), module=module, manifest=m, path=directory, device=device)


def load_compat(directory: Path, device: str = "cpu") -> CompatPack:
    m = _read_manifest(directory)
    if m.get("kind") != "compat":
        raise ArtifactError(f"{directory}: not a compat artifact")
    sums = m.get("checksum") or {}
    psi, h, sigma = (_load_script(directory / f, sums.get(f), device) for f in COMPAT_FILES)
    return CompatPack(
        from_name=m["from"],
        to_name=m["to"],
        from_dim=int(m["from_dim"]),
        to_dim=int(m["to_dim"]),
        psi=psi,
        h=h,
        sigma=sigma,
        manifest=m,
        path=directory,
        device=device,
    )


def artifact_checksum(directory: Path) -> str:
    """One checksum for a whole artifact directory (its manifest's bytes)."""
    return sha256_file(directory / MANIFEST)


def discover(artifacts_dir: Path) -> tuple[dict[str, Path], dict[tuple[str, str], Path]]:
    """Find encoder and compat artifact directories: ({name: dir}, {(from, to): dir})."""
    encoders: dict[str, Path] = {}
    packs: dict[tuple[str, str], Path] = {}
    if not artifacts_dir.is_dir():
        return encoders, packs
    for sub in sorted(p for p in artifacts_dir.iterdir() if (p / MANIFEST).is_file()):
        m = _read_manifest(sub)
        if m.get("kind") == "encoder":
            encoders[m["name"]] = sub
        elif m.get("kind") == "compat":
            packs[(m["from"], m["to"])] = sub
    return encoders, packs
