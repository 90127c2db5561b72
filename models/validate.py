"""Check an encoder artifact before it is registered: it loads, and a fixed probe batch gives the declared
shape, finite, L2-normalised and deterministic outputs. Each failure is an `InvalidArtifact` that names the
problem in one sentence; nothing is registered unless every check passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.artifacts import ArtifactError, Encoder, _read_manifest, encoder_format, load_encoder
from models.preprocess import GRAY28, InputSpec

PROBE_BATCH = 8
NORM_TOLERANCE = 1e-3
DETERMINISM_TOLERANCE = 1e-5


class InvalidArtifact(ArtifactError):
    """An encoder artifact that fails a check; the message says which and why."""


def probe_batch(spec: InputSpec = GRAY28) -> np.ndarray:
    """A fixed uint8 batch of PROBE_BATCH images at `spec`'s size and channels: smooth blobs (tinted in colour)
    and noise, the same every call."""
    rng = np.random.default_rng(20261124)
    h, w = spec.size
    yy, xx = np.mgrid[0:h, 0:w] * (28.0 / np.array([h, w]).reshape(2, 1, 1))
    blobs = [
        np.exp(-((yy - rng.uniform(6, 22)) ** 2 + (xx - rng.uniform(6, 22)) ** 2) / rng.uniform(8, 60))
        for _ in range(4)
    ]
    noise = [rng.uniform(0, 1, (h, w)) for _ in range(PROBE_BATCH - 4)]
    gray = np.stack(blobs + noise)
    if spec.channels == 3:
        tint = rng.uniform(0.3, 1.0, (PROBE_BATCH, 1, 1, 3))
        return (gray[..., None] * tint * 255).astype(np.uint8)
    return (gray * 255).astype(np.uint8)


def check_encoder(directory: Path) -> Encoder:
    """The loaded encoder when `directory` holds a valid one; `InvalidArtifact` naming the problem otherwise."""
    try:
        manifest = _read_manifest(directory)
    except ArtifactError as e:
        raise InvalidArtifact(f"manifest: {e}") from e
    if manifest.get("kind") != "encoder":
        raise InvalidArtifact(f"manifest: kind is {manifest.get('kind')!r}, expected 'encoder'")
    name, dim = manifest.get("name"), manifest.get("dim")
    if not isinstance(name, str) or not name or name.startswith("compat-"):
        raise InvalidArtifact(f"manifest: name {name!r} is not a model name")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise InvalidArtifact(f"manifest: dim {dim!r} is not a positive integer")
    try:
        encoder_format(manifest)
        spec = InputSpec.from_manifest(manifest.get("input"))
    except (ArtifactError, ValueError) as e:
        raise InvalidArtifact(f"manifest: {e}") from e
    try:
        encoder = load_encoder(directory)
    except Exception as e:  # torch raises many types for a file that is not TorchScript
        raise InvalidArtifact(f"not loadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    images = probe_batch(spec)
    try:
        first, second = encoder.embed(images), encoder.embed(images)
    except Exception as e:
        shape = (PROBE_BATCH, *spec.shape)
        raise InvalidArtifact(f"fails on a probe batch of {shape} images: {type(e).__name__}: {e}") from e
    if first.shape != (len(images), dim):
        raise InvalidArtifact(f"declared dim {dim}, but a batch of {len(images)} images gives shape {first.shape}")
    if not np.isfinite(first).all():
        raise InvalidArtifact(f"outputs are not finite ({int((~np.isfinite(first)).sum())} NaN or inf values)")
    norms = np.linalg.norm(first, axis=1)
    if np.abs(norms - 1).max() > NORM_TOLERANCE:
        raise InvalidArtifact(f"outputs are not L2-normalised (norms {norms.min():.4f} to {norms.max():.4f})")
    if np.abs(first - second).max() > DETERMINISM_TOLERANCE:
        raise InvalidArtifact(
            f"not deterministic: two passes over the same batch differ by {np.abs(first - second).max():.3g}"
        )
    return encoder
