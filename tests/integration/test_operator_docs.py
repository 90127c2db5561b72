"""`/docs` and `/redoc` load their assets from the API itself, and Swagger UI renders with no network at all
(headless Chromium in a network namespace with only loopback; skipped where Chromium or `unshare` is
missing or not root)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from service.api.app import create_app
from service.api.docs import ASSETS, assets_dir
from service.config import REPO_ROOT, Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration


def test_doc_pages_reference_only_their_own_assets(tmp_path: Path) -> None:
    assert assets_dir() is not None, "pip package fastapi-offline (a dependency) is missing"
    client = TestClient(create_app(Settings(data_dir=tmp_path)))  # no lifespan: the pages need no runtime
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        urls = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', html) + re.findall(r"url: ?['\"]([^'\"]+)", html)
        assert urls and all(u.startswith("/") for u in urls), (page, urls)  # nothing from another host
        for url in urls:
            if url.startswith(ASSETS):
                r = client.get(url)
                assert r.status_code == 200 and len(r.content) > 1000, url
    assert "googleapis" not in client.get("/redoc").text


@pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs chromium, unshare and root (apt-get install -y chromium)",
)
def test_swagger_ui_renders_with_networking_disabled() -> None:
    r = subprocess.run(
        ["unshare", "-n", "bash", str(REPO_ROOT / "scripts" / "docs-offline.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PORT": "8765"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # Swagger UI builds these elements in the browser: they exist only if its bundle loaded and ran.
    assert 'data-path="/items"' in r.stdout and 'data-path="/rollouts/{rollout_id}/failures"' in r.stdout
