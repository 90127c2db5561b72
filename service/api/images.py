"""Base64 image payloads -> decoded uint8 images (each model fits them to its input spec when it encodes),
with errors that name the field."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from models.preprocess import InvalidImage, decode
from service.errors import InvalidRequest


def decode_b64(value: str, field: str) -> bytes:
    """Standard padded base64 (the schema's pattern; no data-URL prefix, no whitespace) -> bytes."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(field, f"invalid base64 ({e})") from e
    if not raw:
        raise InvalidRequest(field, "empty image payload")
    return raw


def decode_image(value: str, field: str, max_pixels: int) -> tuple[bytes, np.ndarray]:
    """-> (original bytes, decoded uint8 (H, W) gray or (H, W, 3) RGB). InvalidImage -> 422 naming `field`."""
    raw = decode_b64(value, field)
    try:
        return raw, decode(raw, max_pixels=max_pixels)
    except InvalidImage as e:
        raise InvalidRequest(field, str(e)) from e
