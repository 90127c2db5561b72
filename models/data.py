"""Datasets: Fashion-MNIST from its IDX .gz files (never downloaded at run time) and sklearn's bundled
digits, upscaled to 28x28, for fast tests.

Every loader returns ``(images, labels)``: ``(N, 28, 28) uint8`` and ``(N,) int64``.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DatasetMissing(FileNotFoundError):
    """A dataset file is absent; the message says how to install it."""


DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's package puts the IDX files; callers with settings pass their own folder."""


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def load_fashion_mnist(directory: Path | str | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60,000, "test": 10,000) -> (uint8 (N,28,28), int64 (N,))."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    d = Path(directory) if directory is not None else DEFAULT_DIR
    paths = [d / name for name in FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetMissing(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install the Debian package "
            f"`{DEBIAN_PACKAGE}` (apt-get install {DEBIAN_PACKAGE}), or point BACKFILL_FASHION_MNIST_DIR "
            "at a directory holding the IDX .gz files."
        )
    images = _read_idx(paths[0]).copy()  # writable: torch warns on read-only buffers
    labels = _read_idx(paths[1]).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"{d}: unexpected shapes {images.shape} / {labels.shape}")
    return np.ascontiguousarray(images), labels


def load_digits_28() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled 8x8 digits (1,797 images), upscaled to 28x28 uint8, with int64 labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    small = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(im, mode="L").resize((28, 28), Image.Resampling.BILINEAR)) for im in small]
    )
    return np.ascontiguousarray(images, dtype=np.uint8), d.target.astype(np.int64)


def load(name: str, split: str = "train", directory: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``name`` = "fashion-mnist" or "digits" (digits: "train" = first 1,200 images, "test" = the rest)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(directory, split)
    if name == "digits":
        x, y = load_digits_28()
        return (x[:1200], y[:1200]) if split == "train" else (x[1200:], y[1200:])
    raise ValueError(f"unknown dataset {name!r}")


def fingerprint(*arrays: np.ndarray) -> str:
    """sha256 over the arrays' dtypes, shapes and bytes: identifies the exact training data."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
