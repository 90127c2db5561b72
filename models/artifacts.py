"""Artifacts: TorchScript modules plus a JSON manifest, so serving loads files, never training classes.

Layout under an artifacts directory::

    <name>/manifest.json       {"kind": "encoder", "name", "dim", "format", "input", "config",
    <name>/model.pt | model.onnx   "data_fingerprint", "checksum", "metrics"}; the module maps a batch
                                (B, C, H, W) float32, shaped and normalised as `input` says (an
                                `models.preprocess.InputSpec`; absent = 28 x 28 gray in [0, 1]), to
                                (B, dim) L2-normalised embeddings. `format` is "torchscript" (model.pt,
                                the default) or "onnx" (model.onnx, run by onnxruntime).
    compat-<old>-<new>/manifest.json   {"kind": "compat", "from", "to", "from_dim", "to_dim",
    compat-<old>-<new>/psi.pt           "calibration": {"reverse": {"x": [...], "y": [...]}, "forward": ...},
    compat-<old>-<new>/h.pt             "checksum", "metrics"}; psi: new -> old space, h: old -> new space,
    compat-<old>-<new>/sigma.pt         sigma: old vector -> (B,) uncertainty (higher = backfill earlier).
    compat-<old>-<new>/order.pt         optional: old vector -> (B,) predicted merge benefit (models/order.py);
                                        where present it, not sigma, orders the `uncertainty` policy.

Distances everywhere are squared L2 between L2-normalised vectors (what faiss.IndexFlatL2 returns).
`calibration[mode]` is a monotone piecewise-linear map (knots x -> y, `np.interp`) from the OLD side's
distances onto the NEW side's scale, fitted on training data only; absent = identity.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.preprocess import GRAY28, InputSpec

ENCODER_FILE = "model.pt"
ONNX_FILE = "model.onnx"
ENCODER_FORMATS = {"torchscript": ENCODER_FILE, "onnx": ONNX_FILE}
COMPAT_FILES = ("psi.pt", "h.pt", "sigma.pt")
ORDER_FILE = "order.pt"  # optional in a compat pack
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


class OnnxModule:
    """An ONNX encoder run by onnxruntime, called like a TorchScript module: (B, C, H, W) tensor -> (B, dim)."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0) -> None:
        import onnxruntime as ort  # an optional dependency: only ONNX artifacts need it

        providers = ["CUDAExecutionProvider"] if device.startswith("cuda") else []
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = options.inter_op_num_threads = threads  # 0: onnxruntime's default
        self.session = ort.InferenceSession(str(path), options, providers=[*providers, "CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy().astype(np.float32, copy=False)})
        return torch.from_numpy(np.asarray(out[0], dtype=np.float32))


def _load_onnx(path: Path, expected_sha: str | None, device: str) -> OnnxModule:
    if not path.is_file():
        raise ArtifactError(f"{path} not found")
    if expected_sha is not None and sha256_file(path) != expected_sha:
        raise ArtifactError(f"{path}: checksum mismatch")
    return OnnxModule(path, device)


def encoder_format(manifest: dict[str, Any]) -> str:
    """The manifest's model format, torchscript (the default) or onnx; ArtifactError for anything else."""
    fmt = manifest.get("format", "torchscript")
    if fmt not in ENCODER_FORMATS:
        raise ArtifactError(f"format {fmt!r} is not one of {', '.join(ENCODER_FORMATS)}")
    return str(fmt)


@dataclass
class Encoder:
    """A loaded embedding model and the input it takes."""

    name: str
    dim: int
    module: Callable[[torch.Tensor], torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    device: str = "cpu"
    spec: InputSpec = GRAY28

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray], batch_size: int = 1024) -> np.ndarray:
        """Images -> (N, dim) float32. Decoded images of any size and channels (`models.preprocess.decode`)
        are fitted to this model's input spec; a batch already at its size may be (N, H, W), (N, H, W, C) or
        (N, C, H, W), uint8 or floats in [0, 1]."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        x = torch.from_numpy(self.spec.batch(images))
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
    order: torch.jit.ScriptModule | None = None

    def reverse(self, new_vecs: np.ndarray) -> np.ndarray:
        """psi: new-model vectors (N, to_dim) -> old space (N, from_dim)."""
        return _apply(self.psi, new_vecs, self.device)

    def forward(self, old_vecs: np.ndarray) -> np.ndarray:
        """h: old-model vectors (N, from_dim) -> new space (N, to_dim)."""
        return _apply(self.h, old_vecs, self.device)

    def uncertainty(self, old_vecs: np.ndarray) -> np.ndarray:
        """The learned order's score of (N, from_dim) old vectors -> (N,); higher = backfill earlier. The
        order net's predicted merge benefit where the pack has one, else FastFill's sigma."""
        return _apply(self.order if self.order is not None else self.sigma, old_vecs, self.device).reshape(-1)

    def calibrate(self, mode: str, distances: np.ndarray) -> np.ndarray:
        """Map OLD-side distances of `mode` onto the NEW side's scale (identity when not fitted)."""
        return apply_calibration((self.manifest.get("calibration") or {}).get(mode), distances)


def save_encoder(module: torch.nn.Module, directory: Path, manifest: dict[str, Any]) -> Path:
    """Script `module`, write it and its manifest (with checksum) to `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module.eval())
    torch.jit.save(scripted, str(directory / ENCODER_FILE))
    spec = InputSpec.from_manifest(manifest.get("input")).to_manifest()
    manifest = {
        **manifest,
        "kind": "encoder",
        "format": "torchscript",
        "input": spec,
        "checksum": sha256_file(directory / ENCODER_FILE),
    }
    for key in ("name", "dim"):
        if key not in manifest:
            raise ArtifactError(f"encoder manifest needs {key!r}")
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return directory


def export_onnx(source: Path, directory: Path, name: str | None = None, opset: int = 17) -> Path:
    """Write the TorchScript encoder in `source` as an ONNX artifact (model.onnx + manifest, same input
    spec, `name` or the same name) in `directory`, with a dynamic batch axis."""
    enc = load_encoder(source)
    directory.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((2, *enc.spec.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            enc.module,  # type: ignore[arg-type]
            (example,),
            str(directory / ONNX_FILE),
            dynamo=False,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=opset,
        )
    manifest = {
        **{k: v for k, v in enc.manifest.items() if k not in {"checksum", "metrics"}},
        "name": name or enc.name,
        "format": "onnx",
        "exported_from": {"name": enc.name, "checksum": enc.manifest.get("checksum")},
        "input": enc.spec.to_manifest(),
        "checksum": sha256_file(directory / ONNX_FILE),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return directory


def save_compat(
    psi: torch.nn.Module,
    h: torch.nn.Module,
    sigma: torch.nn.Module,
    directory: Path,
    manifest: dict[str, Any],
    order: torch.nn.Module | None = None,
) -> Path:
    """Script and write psi, h, sigma (and the order net when given) and the manifest (with per-file
    checksums)."""
    directory.mkdir(parents=True, exist_ok=True)
    checksums = {}
    files = zip((*COMPAT_FILES, ORDER_FILE), (psi, h, sigma, order), strict=True)
    for name, module in ((n, m) for n, m in files if m is not None):
        scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module.eval())
        torch.jit.save(scripted, str(directory / name))
        checksums[name] = sha256_file(directory / name)
    if order is None:
        (directory / ORDER_FILE).unlink(missing_ok=True)
    for key in ("from", "to", "from_dim", "to_dim"):
        if key not in manifest:
            raise ArtifactError(f"compat manifest needs {key!r}")
    manifest = {**manifest, "kind": "compat", "checksum": checksums}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return directory


def save_order(order: torch.nn.Module, directory: Path, info: dict[str, Any]) -> None:
    """Write (or replace) a compat pack's order net; its checksum and `info` go into the manifest."""
    m = _read_manifest(directory)
    scripted = order if isinstance(order, torch.jit.ScriptModule) else torch.jit.script(order.eval())
    torch.jit.save(scripted, str(directory / ORDER_FILE))
    checksums = {**(m.get("checksum") or {}), ORDER_FILE: sha256_file(directory / ORDER_FILE)}
    update_manifest(directory, checksum=checksums, order=info)


def update_manifest(directory: Path, **fields: Any) -> None:
    """Replace top-level manifest fields (predictions, calibration) of an artifact; its files are unchanged."""
    manifest = {**_read_manifest(directory), **fields}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def load_encoder(directory: Path, device: str = "cpu") -> Encoder:
    m = _read_manifest(directory)
    if m.get("kind") != "encoder":
        raise ArtifactError(f"{directory}: not an encoder artifact")
    fmt = encoder_format(m)
    try:
        spec = InputSpec.from_manifest(m.get("input"))
    except ValueError as e:
        raise ArtifactError(f"{directory}: {e}") from e
    path = directory / ENCODER_FORMATS[fmt]
    module: Callable[[torch.Tensor], torch.Tensor] = (
        _load_onnx(path, m.get("checksum"), device) if fmt == "onnx" else _load_script(path, m.get("checksum"), device)
    )
    return Encoder(
        name=m["name"], dim=int(m["dim"]), module=module, manifest=m, path=directory, device=device, spec=spec
    )


def load_compat(directory: Path, device: str = "cpu") -> CompatPack:
    m = _read_manifest(directory)
    if m.get("kind") != "compat":
        raise ArtifactError(f"{directory}: not a compat artifact")
    sums = m.get("checksum") or {}
    psi, h, sigma = (_load_script(directory / f, sums.get(f), device) for f in COMPAT_FILES)
    order = _load_script(directory / ORDER_FILE, sums[ORDER_FILE], device) if ORDER_FILE in sums else None
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
        order=order,
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
