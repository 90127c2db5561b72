"""The one preprocessing path shared by training, evaluation, the service and the worker.

Two steps. `decode` turns PNG/JPEG/NPY bytes or an array into a canonical uint8 image at its own size:
(H, W) gray or (H, W, 3) RGB; every refusal is an `InvalidImage` whose message says what is wrong, so
the service can answer 4xx with it. Then each encoder's `InputSpec` (from its manifest's `input`) fits
that image to the model: channels, size and resize policy (`fit`, uint8), then scaling to [0, 1] and
mean/std normalisation (`batch`, float32 NCHW). Two models with different inputs can therefore encode
the same stored bytes side by side. `preprocess` = `decode` then `fit` (the shipped models' 28 x 28 gray
spec by default).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

SIZE = 28
DEFAULT_MAX_PIXELS = 1024 * 1024
NPY_MAGIC = b"\x93NUMPY"
RESIZE_POLICIES = ("stretch", "crop", "pad")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
MAX_SIDE = 4096


Images = np.ndarray | Sequence[np.ndarray]  # a batch at one size, or decoded images of any sizes


class InvalidImage(ValueError):
    """The input cannot be turned into a model input; the message names the problem."""


# --- decode: bytes or array -> canonical uint8 (H, W) or (H, W, 3) --------------------------------------
def _from_array(a: np.ndarray) -> np.ndarray:
    if a.dtype == object or a.dtype.kind not in "uif b":
        raise InvalidImage(f"unsupported array dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise InvalidImage(f"expected a 2-D grayscale or (H, W, 3) RGB array, got shape {tuple(a.shape)}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InvalidImage("empty array")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)):
            raise InvalidImage("array contains NaN or infinite values")
        if a.min() < 0.0 or a.max() > 1.0:
            raise InvalidImage("float arrays must hold values in [0, 1]")
        a = np.rint(a * 255.0).astype(np.uint8)
    elif a.dtype.kind == "b":
        a = a.astype(np.uint8) * 255
    else:
        if a.min() < 0 or a.max() > 255:
            raise InvalidImage("integer arrays must hold values in [0, 255]")
        a = a.astype(np.uint8)
    return np.ascontiguousarray(a, dtype=np.uint8)


def _decode_npy(data: bytes, max_pixels: int) -> np.ndarray:
    buf = io.BytesIO(data)
    try:  # check the declared shape before numpy allocates it
        major, _minor = np.lib.format.read_magic(buf)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(buf)
    except Exception as e:
        raise InvalidImage(f"invalid NPY payload: {e}") from e
    if int(np.prod(shape, dtype=np.float64)) > max_pixels:
        raise InvalidImage(f"NPY array of shape {tuple(shape)} has more values than the limit of {max_pixels}")
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises several types for bad headers
        raise InvalidImage(f"invalid NPY payload: {e}") from e
    if a.size > max_pixels:
        raise InvalidImage(f"array has {a.size} values, more than the limit of {max_pixels}")
    return a


def _decode_raster(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in {"PNG", "JPEG"}:
                raise InvalidImage(f"unsupported image format {img.format}; send PNG, JPEG or NPY")
            w, h = img.size
            if w * h > max_pixels:
                raise InvalidImage(f"image is {w}x{h}, more than the limit of {max_pixels} pixels")
            img.load()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidImage(f"image too large: {e}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for corrupt data
        raise InvalidImage(f"cannot decode image: {e}") from e
    if img.mode in {"I", "I;16"}:
        a = np.asarray(img, dtype=np.float64)
        a = a / max(a.max(), 1.0)
        return a.astype(np.float32)
    if img.mode in {"L", "LA", "1"}:
        return np.asarray(img.convert("L"))
    if img.mode in {"RGB", "RGBA", "P"}:
        return np.asarray(img.convert("RGB"))
    raise InvalidImage(f"unsupported image mode {img.mode}")


def decode(image: bytes | np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """PNG/JPEG/NPY bytes or an array -> uint8 (H, W) gray or (H, W, 3) RGB at the image's own size."""
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        if not data:
            raise InvalidImage("empty image payload")
        a = _decode_npy(data, max_pixels) if data.startswith(NPY_MAGIC) else _decode_raster(data, max_pixels)
    else:
        a = np.asarray(image)
        if a.size > max_pixels:
            raise InvalidImage(f"array has {a.size} values, more than the limit of {max_pixels}")
    return _from_array(a)


# --- a model's input spec ------------------------------------------------------------------------------
def _floats(values: Sequence[float], name: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"input.{name} must hold finite numbers")
    return out


@dataclass(frozen=True)
class InputSpec:
    """What an encoder takes: `channels` (1 gray, 3 RGB), `size` (height, width), how a decoded image of
    another size gets there (`resize`: "stretch" to size; "crop": scale the shorter side to size /
    `crop_fraction`, then a centre crop; "pad": fit the longer side, centre, pad with black), the
    `interpolation`, and per-channel `mean`/`std` applied to values in [0, 1]."""

    channels: int = 1
    size: tuple[int, int] = (SIZE, SIZE)
    resize: str = "stretch"
    crop_fraction: float = 1.0
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = field(default=(0.0,))
    std: tuple[float, ...] = field(default=(1.0,))

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"input.channels must be 1 or 3, got {self.channels!r}")
        if len(self.size) != 2 or not all(isinstance(s, int) and 1 <= s <= MAX_SIDE for s in self.size):
            raise ValueError(f"input.size must be [height, width] in 1..{MAX_SIDE}, got {list(self.size)!r}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"input.resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"input.crop_fraction must be in (0, 1], got {self.crop_fraction!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"input.interpolation must be one of {', '.join(INTERPOLATIONS)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"input.mean and input.std need {self.channels} value(s) each (one per channel)")
        if min(self.std) <= 0:
            raise ValueError("input.std values must be positive")

    @classmethod
    def from_manifest(cls, spec: Mapping[str, Any] | None) -> InputSpec:
        """The spec of a manifest's `input` (absent = the shipped 28 x 28 gray spec; an older manifest's
        `shape: [C, H, W]` is read as channels and size). ValueError naming the bad field."""
        spec = dict(spec or {})
        shape = spec.get("shape")
        try:
            channels = int(spec.get("channels", shape[0] if shape else 1))
            size = tuple(int(v) for v in spec.get("size", shape[1:] if shape else (SIZE, SIZE)))
            default = (0.0,) * channels, (1.0,) * channels
            mean, std = _floats(spec.get("mean", default[0]), "mean"), _floats(spec.get("std", default[1]), "std")
            crop_fraction = float(spec.get("crop_fraction", 1.0))
        except (TypeError, ValueError, IndexError) as e:
            raise ValueError(f"input spec is malformed ({e})") from e
        if len(size) != 2:
            raise ValueError(f"input.size must be [height, width], got {list(size)!r}")
        return cls(
            channels=channels,
            size=(size[0], size[1]),
            resize=str(spec.get("resize", "stretch")),
            crop_fraction=crop_fraction,
            interpolation=str(spec.get("interpolation", "bilinear")),
            mean=mean,
            std=std,
        )

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d, "size": list(self.size), "mean": list(self.mean), "std": list(self.std)}

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one model input."""
        return (self.channels, *self.size)

    def _geometry(self, img: Image.Image) -> Image.Image:
        h, w = self.size
        if img.size == (w, h):
            return img
        method = INTERPOLATIONS[self.interpolation]
        if self.resize == "stretch":
            return img.resize((w, h), method)
        iw, ih = img.size
        if self.resize == "crop":
            scale = max(h / ih, w / iw) / self.crop_fraction
            sw, sh = max(w, round(iw * scale)), max(h, round(ih * scale))
            left, top = (sw - w) // 2, (sh - h) // 2
            return img.resize((sw, sh), method).crop((left, top, left + w, top + h))
        scale = min(h / ih, w / iw)
        sw, sh = max(1, round(iw * scale)), max(1, round(ih * scale))
        canvas = Image.new(img.mode, (w, h))
        canvas.paste(img.resize((sw, sh), method), ((w - sw) // 2, (h - sh) // 2))
        return canvas

    def fit(self, image: np.ndarray) -> np.ndarray:
        """A decoded uint8 image -> uint8 (H, W) (1 channel) or (H, W, 3) at this spec's size."""
        a = np.asarray(image, dtype=np.uint8)
        if self.channels == 1 and a.ndim == 3:
            img = Image.fromarray(a, mode="RGB").convert("L")
        elif self.channels == 3 and a.ndim == 2:
            img = Image.fromarray(a, mode="L").convert("RGB")
        elif a.shape[:2] == self.size:
            return a
        else:
            img = Image.fromarray(a)
        return np.array(self._geometry(img))  # np.array: a writable copy

    def batch(self, images: Images) -> np.ndarray:
        """Images -> float32 (N, C, H, W), normalised. Takes decoded images of any sizes (fitted one by
        one), or a batch already at this size: (N, H, W) / (N, H, W, C) / (N, C, H, W), uint8 or [0, 1]."""
        a = images if isinstance(images, np.ndarray) else None
        if a is None or not self._fits(a):
            fitted = [self.fit(_as_uint8(np.asarray(x))) for x in images]
            a = np.stack(fitted) if fitted else np.zeros((0, *self.size), np.uint8)
        x = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32, copy=False)
        if x.ndim == 3:
            x = x[:, None]
        elif x.shape[-1] == self.channels and x.shape[1:3] == self.size:
            x = x.transpose(0, 3, 1, 2)
        if self.mean != (0.0,) * self.channels or self.std != (1.0,) * self.channels:
            m = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
            s = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
            x = (x - m) / s
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x if x.flags.writeable else x.copy()  # torch warns on read-only arrays

    def _fits(self, a: np.ndarray) -> bool:
        c, (h, w) = self.channels, self.size
        if a.ndim == 3:
            return c == 1 and a.shape[1:] == (h, w)
        return a.ndim == 4 and (a.shape[1:] == (c, h, w) or a.shape[1:] == (h, w, c))


def _as_uint8(a: np.ndarray) -> np.ndarray:
    """A dataset image (uint8, or floats in [0, 1], optionally channel-first) -> canonical uint8."""
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    return a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a


GRAY28 = InputSpec()


def preprocess(image: bytes | np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS, spec: InputSpec = GRAY28) -> np.ndarray:
    """PNG/JPEG/NPY bytes or an array -> the uint8 model input of `spec` (default (28, 28) gray)."""
    return spec.fit(decode(image, max_pixels))


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 (H, W) gray or (H, W, 3) RGB image -> PNG bytes (how the demo and tests send images)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
