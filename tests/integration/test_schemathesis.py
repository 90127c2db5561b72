"""Property-based bad-input run: schemathesis generates requests from the app's own OpenAPI schema (valid and
invalid ones) for every operation and sends them in-process to the ASGI app on real Postgres + Redis.

Asserted over >= 1,000 generated cases in total: no 5xx, and every response conforms to the schema the app
publishes (status codes and bodies, including the error bodies). Deterministic: hypothesis is derandomized
(fixed seed), has no example database, and health checks that only concern generation speed are off.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis.errors import Unsatisfiable
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from devtools.fakes import make_tiny_artifacts, seed_gallery
from service.api.app import create_app
from service.config import Settings
from service.db import make_engine, make_sessionmaker

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

TOKEN = "schemathesis-operator-token-0123456789"
MIN_TOTAL_CASES = 1000
# Per operation and generation mode: 60 examples, 2 modes; operations without inputs have a single positive
# case and no negative ones (20 operations on 2026-11-24: 1,924 cases; the total is asserted below).
EXAMPLES = 60


@pytest.fixture
def app_client(settings: Settings, tmp_path: Path) -> Iterator[TestClient]:
    artifacts = make_tiny_artifacts(tmp_path / "artifacts")
    s = settings.model_copy(
        update={
            "artifacts_dir": tmp_path / "artifacts",
            "operator_token": SecretStr(TOKEN),
            "ingest_poll_seconds": 0.05,
            "max_k": 50,
            "max_batch_queries": 16,
        }
    )
    engine = make_engine(s)
    with make_sessionmaker(engine)() as session:
        seed_gallery(session, artifacts, 40)
    engine.dispose()
    with TestClient(create_app(s)) as client:
        assert client.app.state.runtime.wait_ready(30)  # type: ignore[attr-defined]
        yield client


def _without_lifespan(app: Any) -> Any:
    """The app as schemathesis sees it: the TestClient above owns the lifespan (start-up and shutdown),
    schemathesis only sends HTTP requests (refusing the lifespan scope = 'no lifespan support'). An
    exception escaping the app becomes the 500 a real server would send, so every failure is collected."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("lifespan is managed by the test")
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, tracking_send)
        except Exception as e:  # an unhandled error is what a client sees as a 500: report it as one
            if started:
                raise
            body = f"unhandled {type(e).__name__}: {e}".encode()[:2000]
            await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": body})

    return asgi


def _fuzz(
    op: Any,
    mode: GenerationMode,
    auth: dict[str, str],
    checks: list[Any],
    counts: Counter[str],
    statuses: Counter[int],
    failures: list[str],
) -> None:
    label = f"{op.label} [{mode.value}]"

    @given(case=op.as_strategy(generation_mode=mode))
    @hsettings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        counts[label] += 1
        response = case.call(headers=auth)
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=checks)
        except (Exception, BaseExceptionGroup) as e:  # collect every failing operation, do not stop at the first
            failures.append(f"{label} -> {response.status_code}: {e}"[:2000])

    try:
        run()
    except Unsatisfiable:  # e.g. negative cases of an operation without parameters or body
        assert mode == GenerationMode.NEGATIVE, label


def test_generated_requests_never_5xx_and_match_schema(app_client: TestClient) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", _without_lifespan(app_client.app))
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    counts: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(op, mode, auth, checks, counts, statuses, failures)
    total = sum(counts.values())
    print(f"\nschemathesis: {total} cases over {len(operations)} operations; statuses {dict(sorted(statuses.items()))}")
    for label, n in sorted(counts.items()):
        print(f"  {n:4d}  {label}")
    for f in failures:
        print("FAILURE", f.replace("\n", " ")[:600])
    assert not failures, "\n\n".join(failures[:10])
    assert not [c for c in statuses if c >= 500]
    assert total >= MIN_TOTAL_CASES
