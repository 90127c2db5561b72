"""A value the database refuses is the request's fault: 422 in the `{"detail": {"field", "problem"}}` shape,
never a 500, and no SQL in the answer (service/api/errors.py maps SQLAlchemy's DataError generally).

The first test adds probe routes to a real app on Postgres that send such values (a NUL byte in text, an
integer beyond BIGINT, a malformed literal) straight to the database, so the handler is tested on its own,
whatever validation the real routes add in front of it. The second test sends a NUL byte through a real
query parameter that has no pattern.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request

from service.api.app import create_app
from service.config import Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

PROBES: dict[str, Any] = {
    "nul": sa.select(sa.literal("a\x00b", sa.String)),
    "bigint": sa.select(sa.cast(sa.literal(2**70), sa.BigInteger)),
    "integer": sa.select(sa.cast(sa.literal("twelve", sa.String), sa.Integer)),
}


def _with_probes(app: FastAPI) -> FastAPI:
    def probe(name: str, request: Request) -> dict[str, Any]:
        with request.app.state.runtime.sessionmaker() as session:
            return {"value": str(session.execute(PROBES[name]).scalar())}

    app.add_api_route("/_probe/{name}", probe, methods=["GET"])
    return app


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(_with_probes(create_app(settings)), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(
    ("name", "words"),
    [("nul", "NUL"), ("bigint", "out of range"), ("integer", "invalid input syntax")],
)
def test_values_the_database_refuses_are_422_without_sql(client: TestClient, name: str, words: str) -> None:
    r = client.get(f"/_probe/{name}")
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail["field"] == "request"
    assert words in detail["problem"], detail
    assert "SELECT" not in r.text and "CAST" not in r.text and "%(" not in r.text


def test_a_nul_byte_in_a_query_parameter_is_a_4xx_not_a_500(client: TestClient) -> None:
    """`GET /items?model=...` takes any 1-64 characters; a NUL byte reaches the database lookup."""
    r = client.get("/items", params={"model": "v\x001"})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["detail"]["field"] in {"request", "model"}
