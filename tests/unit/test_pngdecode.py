"""worker.pngdecode.decode_payload against the reference `models.preprocess.decode`: the same array for every
image it accepts and the same InvalidImage message for every payload it refuses, on random images, corrupted
payloads and the PNG variants that take the reference path."""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from models import preprocess
from models.preprocess import InvalidImage, encode_png
from worker import pngdecode
from worker.pngdecode import decode_payload


def _outcome(fn: Callable[..., np.ndarray], data: bytes, **kw: int) -> tuple[str, object]:
    try:
        return "ok", fn(data, **kw)
    except InvalidImage as e:  # PIL names its file object by address
        return "invalid", re.sub(r" at 0x[0-9a-f]+", "", str(e))


def _same(data: bytes, **kw: int) -> None:
    fast, ref = _outcome(decode_payload, data, **kw), _outcome(preprocess.decode, data, **kw)
    assert fast[0] == ref[0], (fast, ref)
    if fast[0] == "ok":
        a, b = fast[1], ref[1]
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
        assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert fast[1] == ref[1]


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Payloads that went to the reference decoder."""
    seen: list[bytes] = []
    real = pngdecode.decode

    def spy(data: bytes, max_pixels: int = preprocess.DEFAULT_MAX_PIXELS) -> np.ndarray:
        seen.append(data)
        return real(data, max_pixels)

    monkeypatch.setattr(pngdecode, "decode", spy)
    return seen


def _png(img: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def test_plain_pngs_take_the_fast_path_and_match(fallbacks: list[bytes]) -> None:
    rng = np.random.default_rng(0)
    for k in range(60):
        h, w = (int(v) for v in rng.integers(1, 70, size=2))
        shape = (h, w) if k % 2 else (h, w, 3)
        img = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if k % 3 == 0:  # smooth images: other PNG row filters than for noise
            img = np.cumsum(img, axis=0, dtype=np.uint8)
        data = encode_png(img)
        _same(data)
        np.testing.assert_array_equal(decode_payload(data), img)
    assert fallbacks == []


def test_corrupted_payloads_decode_or_fail_like_the_reference() -> None:
    rng = np.random.default_rng(1)
    base = [encode_png(rng.integers(0, 256, size=(28, 28), dtype=np.uint8)) for _ in range(5)]
    base.append(encode_png(np.zeros((28, 28, 3), np.uint8)))
    for data in base:
        for _ in range(40):  # flip bytes anywhere (header, chunk lengths, CRCs, pixel data)
            b = bytearray(data)
            for pos in rng.integers(0, len(b), size=int(rng.integers(1, 4))):
                b[pos] = int(rng.integers(0, 256))
            _same(bytes(b))
        for cut in (0, 1, 8, 16, 33, len(data) // 2, len(data) - 12, len(data) - 1):
            _same(data[:cut])
        _same(data + b"trailing bytes")
        _same(data[:8] + data[8:].replace(b"IDAT", b"IDAX", 1))


def test_other_png_variants_take_the_reference_path(fallbacks: list[bytes]) -> None:
    rng = np.random.default_rng(2)
    gray = Image.fromarray(rng.integers(0, 256, size=(20, 30), dtype=np.uint8))
    variants = {
        "palette": _png(gray.convert("P")),
        "16-bit": _png(Image.fromarray((rng.integers(0, 65535, size=(9, 7))).astype(np.uint16))),
        "gray+alpha": _png(gray.convert("LA")),
        "rgba": _png(gray.convert("RGBA")),
        "1-bit": _png(gray.convert("1")),
        "interlaced": _interlaced(_png(gray)),
        "text chunk": _png(gray, pnginfo=_text()),
        "dpi chunk": _png(gray, dpi=(72, 72)),
    }
    for name, data in variants.items():
        fallbacks.clear()
        _same(data)
        assert fallbacks, name


def _interlaced(data: bytes) -> bytes:
    """The same PNG with IHDR's interlace flag set (Pillow does not write interlaced PNGs)."""
    ihdr = bytearray(data[12:29])  # chunk type + 13 data bytes
    ihdr[-1] = 1
    return data[:12] + bytes(ihdr) + zlib.crc32(bytes(ihdr)).to_bytes(4, "big") + data[33:]


def _text() -> object:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("k", "v")
    return info


def test_limits_and_non_png_payloads_match(fallbacks: list[bytes]) -> None:
    img = encode_png(np.full((40, 50), 7, np.uint8))
    _same(img, max_pixels=40 * 50)  # at the limit: decoded
    _same(img, max_pixels=40 * 50 - 1)  # over it: the reference's message
    buf = io.BytesIO()
    np.save(buf, np.ones((4, 4), np.uint8))
    jpeg = io.BytesIO()
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(jpeg, format="JPEG")
    for data in (b"", b"not an image", buf.getvalue(), jpeg.getvalue(), preprocess.NPY_MAGIC):
        _same(data)
    np.testing.assert_array_equal(decode_payload(np.full((3, 3), 5, np.uint8)), np.full((3, 3), 5, np.uint8))
