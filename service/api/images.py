"""Base64 image payloads -> (28, 28) uint8 model inputs, with errors that name the field."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from models.preprocess import InvalidImage, preprocess
from service.errors import InvalidRequest


def decode_b64(value: str, field: str) -> bytes:
    s = value.strip()
    if s.startswith("data:") and "," in s:  # tolerate data URLs
        s = s.split(",", 1)[1]
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(field, f"invalid base64 ({e})") from e
    if not raw:
        raise InvalidRequest(field, "empty image payload")
    return raw


def decode_image(value: str, field: str, max_pixels: int) -> tuple[bytes, np.ndarray]:
    """-> (original bytes, preprocessed (28, 28) uint8). InvalidImage -> 422 naming `field`."""
    raw = decode_b64(value, field)
    try:
        return raw, preprocess(raw, max_pixels=max_pixels)
    except InvalidImage as e:
        raise InvalidRequest(field, str(e)) from e
