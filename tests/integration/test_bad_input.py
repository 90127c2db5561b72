"""Hand-written hostile images against /search, /search/batch and /items on real Postgres + Redis: each is
answered with a 4xx whose body names the field and the problem, never a 500 (and never a hang)."""

from __future__ import annotations

import base64
import io
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools.fakes import make_artifacts
from service.api.app import create_app
from service.config import Settings
from tests.conftest import truncate_all

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer dev-operator-token"}
MAX_BODY = 4 * 1024 * 1024


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header (IHDR) that declares width x height, followed by almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def sample() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)


def truncated_png() -> bytes:
    return _png(Image.fromarray(sample()))[:120]


def decompression_bomb() -> bytes:
    """8000 x 8000 black pixels (64 MPixel) in ~60 KB: tiny on the wire, huge once decoded."""
    data = _png(Image.new("L", (8000, 8000)))
    assert len(data) < 200_000
    return data


def cmyk_jpeg() -> bytes:
    return _jpeg(Image.new("CMYK", (28, 28), (10, 20, 30, 40)))


def npy_declaring(shape: str) -> bytes:
    """A valid 2x2 uint8 NPY whose header is rewritten to declare `shape`; the data stays 4 bytes."""
    data = _npy(np.zeros((2, 2), np.uint8))
    return data.replace(b"(2, 2)", shape.encode().ljust(len(b"(2, 2)")))  # header length is padded


# (name, payload factory, words the problem must contain (any of))
CASES: list[tuple[str, Callable[[], bytes], tuple[str, ...]]] = [
    ("truncated-png", truncated_png, ("truncated", "cannot decode")),
    ("png-header-100000x100000", lambda: png_claiming(100_000, 100_000), ("too large", "limit")),
    ("png-header-2000x2000", lambda: png_claiming(2000, 2000), ("limit",)),
    ("decompression-bomb", decompression_bomb, ("limit", "too large")),
    ("cmyk-jpeg", cmyk_jpeg, ("mode CMYK",)),
    ("gif", lambda: _gif(), ("unsupported image format",)),
    ("not-an-image", lambda: b"hello, world" * 10, ("cannot decode",)),
    ("npy-nan", lambda: _npy(np.full((28, 28), np.nan, np.float32)), ("NaN",)),
    ("npy-inf", lambda: _npy(np.full((28, 28), np.inf, np.float64)), ("infinite",)),
    ("npy-mixed-nan", lambda: _npy(np.where(np.eye(28) > 0, np.nan, 0.5)), ("NaN",)),
    ("npy-out-of-range-float", lambda: _npy(np.full((28, 28), 3.0)), ("[0, 1]",)),
    ("npy-negative-int", lambda: _npy(np.full((28, 28), -5, np.int16)), ("[0, 255]",)),
    ("npy-3d", lambda: _npy(np.zeros((3, 28, 28), np.uint8)), ("2-D", "shape (3, 28, 28)")),
    ("npy-1d", lambda: _npy(np.zeros((784,), np.uint8)), ("2-D",)),
    ("npy-4d", lambda: _npy(np.zeros((1, 1, 28, 28), np.uint8)), ("2-D",)),
    ("npy-empty", lambda: _npy(np.zeros((0, 28), np.uint8)), ("empty",)),
    ("npy-complex", lambda: _npy(np.zeros((28, 28), np.complex64)), ("dtype",)),
    ("npy-strings", lambda: _npy(np.full((28, 28), "a")), ("dtype",)),
    ("npy-too-many-values", lambda: _npy(np.zeros((1200, 1200), np.uint8)), ("limit",)),
    ("npy-header-claims-100000x100000", lambda: npy_declaring("(100000, 100000)"), ("NPY",)),
    ("npy-garbage-after-magic", lambda: b"\x93NUMPY\x01\x00" + b"\xff" * 40, ("NPY",)),
]


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="GIF")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(pg_url: str, redis_session_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app for the whole module (the cases only read): empty tables, tiny artifacts, an empty Redis db."""
    import redis as redis_lib

    truncate_all(pg_url)
    redis_lib.Redis.from_url(redis_session_url).flushdb()
    tmp: Path = tmp_path_factory.mktemp("bad-input")
    s = Settings(
        database_url=pg_url,
        redis_url=redis_session_url,
        data_dir=tmp / "data",
        artifacts_dir=make_artifacts(tmp / "artifacts"),
        ingest_poll_seconds=0.05,
    )
    with TestClient(create_app(s)) as c:
        assert c.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        ok = {"id": "ok-1", "image_b64": base64.b64encode(_png(Image.fromarray(sample()))).decode()}
        assert c.post("/items", json={"items": [ok]}, headers=AUTH).status_code == 200
        yield c
    truncate_all(pg_url)


def _assert_clear_4xx(r: object, field: str, words: tuple[str, ...]) -> None:
    status = r.status_code  # type: ignore[attr-defined]
    assert 400 <= status < 500, f"{status}: {r.text}"  # type: ignore[attr-defined]
    detail = r.json()["detail"]  # type: ignore[attr-defined]
    assert detail["field"] == field, detail
    assert any(w.lower() in detail["problem"].lower() for w in words), detail


@pytest.mark.parametrize(("name", "make", "words"), CASES, ids=[c[0] for c in CASES])
def test_hostile_image_is_a_clear_4xx(
    client: TestClient, name: str, make: Callable[[], bytes], words: tuple[str, ...]
) -> None:
    payload = base64.b64encode(make()).decode()
    assert len(payload) < MAX_BODY  # these are decoding problems, not body-size ones (413 is tested elsewhere)
    t0 = time.perf_counter()
    r = client.post("/search", json={"image_b64": payload, "k": 1})
    assert time.perf_counter() - t0 < 5.0, "a hostile image must be refused quickly"
    _assert_clear_4xx(r, "image_b64", words)
    r = client.post(
        "/search/batch",
        json={
            "queries": [
                {"image_b64": base64.b64encode(_png(Image.fromarray(sample()))).decode()},
                {"image_b64": payload},
            ]
        },
    )
    _assert_clear_4xx(r, "queries[1].image_b64", words)
    r = client.post("/items", json={"items": [{"id": f"bad-{name}", "image_b64": payload}]}, headers=AUTH)
    _assert_clear_4xx(r, "items[0].image_b64", words)
    assert client.get(f"/items/bad-{name}").status_code == 404  # nothing was stored


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("png-16-bit-grayscale", lambda: _png(Image.fromarray(sample().astype(np.uint16) * 257))),
        ("png-rgba", lambda: _png(Image.fromarray(np.dstack([sample()] * 4), mode="RGBA"))),
        ("png-1-bit", lambda: _png(Image.fromarray(sample() > 128))),
        ("png-palette", lambda: _png(Image.fromarray(sample()).convert("P"))),
        ("jpeg-rgb", lambda: _jpeg(Image.fromarray(np.dstack([sample()] * 3)))),
        pytest.param(
            "png-larger-than-28",
            lambda: _png(Image.fromarray(sample()).resize((300, 200))),
            # models/preprocess.py hands torch a read-only array after a resize (a warning, not an error,
            # outside pytest); reported to its owner.
            marks=pytest.mark.filterwarnings("ignore:The given NumPy array is not writable"),
        ),
        ("npy-float-in-unit-range", lambda: _npy(sample() / 255.0)),
        ("npy-bool", lambda: _npy(sample() > 128)),
        ("npy-hw1", lambda: _npy(sample()[..., None])),
    ],
)
def test_unusual_but_valid_images_are_accepted(client: TestClient, name: str, payload: Callable[[], bytes]) -> None:
    """Modes the preprocessing converts on purpose (16-bit gray is rescaled, colour is converted to gray)."""
    r = client.post("/search", json={"image_b64": base64.b64encode(payload()).decode(), "k": 1})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == "ok-1"


def test_body_and_count_limits(client: TestClient) -> None:
    big = "A" * (MAX_BODY + 10)
    r = client.post("/search", json={"image_b64": big})
    assert r.status_code == 413 and r.json()["detail"]["field"] == "body"
    r = client.post("/search", json={"image_b64": "AAAA", "k": 10_000})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "k"
    r = client.post("/search/batch", json={"queries": [{"image_b64": "AAAA"}] * 300})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "queries"
    r = client.post("/search", content=b"\xff\xfe\x00garbage", headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and r.json()["detail"]["field"] == "body", r.text
    r = client.post("/search", content=b"image=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert 400 <= r.status_code < 500 and r.json()["detail"]["field"]


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"id": "a/b"}, "items[0].id"),  # could be created but never read or deleted by path
        ({"id": "nul\x00byte"}, "items[0].id"),  # Postgres text cannot hold NUL: was a 500
        ({"id": "tab\there"}, "items[0].id"),
        ({"id": "x", "label": 2**31}, "items[0].label"),  # beyond the int4 column: was a 500
        ({"id": "x", "label": -(2**31) - 1}, "items[0].label"),
    ],
)
def test_ids_and_labels_out_of_bounds_are_422(client: TestClient, item: dict[str, object], field: str) -> None:
    body = {"items": [{"image_b64": base64.b64encode(_png(Image.fromarray(sample()))).decode(), **item}]}
    r = client.post("/items", json=body, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"]["field"] == field, r.text
    assert client.get("/items/x").status_code == 404  # nothing stored


def test_a_nul_byte_in_an_item_path_is_422(client: TestClient) -> None:
    assert client.get("/items/a%00b").status_code == 422
    assert client.delete("/items/a%00b", headers=AUTH).status_code == 422


@pytest.mark.parametrize(
    ("path", "served"),
    [("/items/x", {"GET", "DELETE"}), ("/rollouts/1", {"GET", "PATCH"}), ("/items", {"POST"})],
)
def test_a_405_names_every_method_the_path_serves(client: TestClient, path: str, served: set[str]) -> None:
    r = client.request("PUT", path, headers=AUTH)
    assert r.status_code == 405 and r.json()["detail"]["field"] == "method"
    assert served <= {m.strip() for m in r.headers["allow"].split(",")}, r.headers["allow"]
