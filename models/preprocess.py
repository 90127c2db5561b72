"""The one preprocessing function shared by training, evaluation, the service and the worker.

An image arrives as PNG/JPEG bytes, NPY bytes or an array; it leaves as a (28, 28) uint8 array (the
encoders' input, see `models.artifacts.Encoder.embed`). Every refusal is an `InvalidImage` whose message
says what is wrong, so the service can answer 4xx with it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

SIZE = 28
DEFAULT_MAX_PIXELS = 1024 * 1024
NPY_MAGIC = b"\x93NUMPY"


class InvalidImage(ValueError):
    """The input cannot be turned into a model input; the message names the problem."""


def _from_array(a: np.ndarray) -> np.ndarray:
    if a.dtype == object or a.dtype.kind not in "uif b":
        raise InvalidImage(f"unsupported array dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise InvalidImage(f"expected a 2-D grayscale array, got shape {tuple(a.shape)}")
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
    if a.shape != (SIZE, SIZE):
        a = np.array(Image.fromarray(a).resize((SIZE, SIZE), Image.Resampling.BILINEAR))  # writable copy
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
    if img.mode not in {"L", "RGB", "RGBA", "P", "LA", "I", "I;16", "1"}:
        raise InvalidImage(f"unsupported image mode {img.mode}")
    if img.mode in {"I", "I;16"}:
        a = np.asarray(img, dtype=np.float64)
        a = a / max(a.max(), 1.0)
        return a.astype(np.float32)
    return np.asarray(img.convert("L"))


def preprocess(image: bytes | np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """PNG/JPEG/NPY bytes or an array -> (28, 28) uint8, grayscale, resized when needed."""
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


def encode_png(image: np.ndarray) -> bytes:
    """(28, 28) uint8 -> PNG bytes (how the demo and tests send images)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()
