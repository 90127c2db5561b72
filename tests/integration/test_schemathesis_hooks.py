"""Schemathesis hooks for the live-HTTP run (tests/integration/test_schemathesis_live.py), loaded by the `st`
subprocess through SCHEMATHESIS_HOOKS=<this file>. Imported by pytest it registers nothing.

- `before_call`: an `image_b64` that is valid base64 (what the schema states) is replaced by a real PNG
  derived from it, so that schema-valid requests carry decodable images and the positive-data checks test
  acceptance, not the image decoder (tests/integration/test_bad_input.py covers undecodable images).
- `filter_failure`: drops exactly the "schema-valid request rejected" failures whose 422 is a check no JSON
  schema can state: `POST /upgrade` to a model that is not registered or already serves, `POST /models`
  with bytes that are not a loadable model, a page cursor this API did not return. Anything else still
  fails the run.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import re
from typing import Any

IMAGE_FIELD = "image_b64"
DROPPED_LOG_ENV = "ST_DROPPED_LOG"
BASE64 = re.compile(r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")
# (method, path, field, problem regex): 422s that depend on the server's state or on file contents.
SEMANTIC_422 = [
    ("POST", "/upgrade", "to", re.compile(r"is not registered$|is already serving$")),
    # Random bytes are never a loadable model; the input spec's per-channel lengths depend on `channels`.
    ("POST", "/models", "model_b64", re.compile(r".")),
    ("POST", "/models", "input", re.compile(r"one per channel")),
    # A page cursor is opaque: only one this API returned is valid.
    ("GET", "/items", "cursor", re.compile(r"^not a cursor this API returned")),
    ("GET", "/rollouts/{rollout_id}/failures", "cursor", re.compile(r"^not a cursor this API returned")),
]


@functools.lru_cache(maxsize=4096)
def png_b64(seed: str) -> str:
    """A 28 x 28 grayscale PNG, base64, determined by `seed`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:12], 16))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def with_real_images(body: Any) -> Any:
    """`body` with every schema-valid `image_b64` string replaced by a PNG (in place where possible)."""
    if isinstance(body, dict):
        for key, value in body.items():
            if key == IMAGE_FIELD and isinstance(value, str) and len(value) >= 4 and BASE64.match(value):
                body[key] = png_b64(value)
            else:
                with_real_images(value)
    elif isinstance(body, list):
        for value in body:
            with_real_images(value)
    return body


def semantic_422(method: str, path: str, status: int, text: str) -> bool:
    if status != 422:
        return False
    try:
        detail = json.loads(text)["detail"]
    except (ValueError, KeyError, TypeError):
        return False
    return any(
        method == m and path == p and detail.get("field") == f and bool(rx.search(str(detail.get("problem", ""))))
        for m, p, f, rx in SEMANTIC_422
    )


if __name__ == "_schemathesis_hooks":  # loaded by schemathesis, not imported by pytest
    import schemathesis

    @schemathesis.hook
    def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
        if isinstance(case.body, (dict, list)):
            with_real_images(case.body)

    @schemathesis.hook
    def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
        rejected_positive = type(failure).__name__ == "RejectedPositiveData" or "Schema-valid request" in str(
            getattr(failure, "title", "")
        )
        method, path = case.operation.method.upper(), case.operation.path
        if rejected_positive and semantic_422(method, path, response.status_code, response.text):
            if log := os.environ.get(DROPPED_LOG_ENV):  # the test reports what was dropped, per rule
                field = json.loads(response.text)["detail"]["field"]
                with open(log, "a", encoding="utf-8") as f:
                    f.write(f"{method} {path} {field}\n")
            return False
        return True
