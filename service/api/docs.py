"""`/docs` (Swagger UI) and `/redoc` served with their assets from this process, never from a CDN, so the
pages work on a machine with no network. The assets are the copies the `fastapi-offline` package ships
(Swagger UI's bundle and stylesheet, ReDoc's standalone bundle, a favicon); they are served under
`/docs-assets/`. `install(app)` replaces FastAPI's own docs routes (create the app with docs_url=None and
redoc_url=None)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def assets_dir() -> Path | None:
    """The folder holding the packaged Swagger UI and ReDoc files, or None when the package is missing."""
    try:
        folder = Path(str(resources.files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None
    return folder if all((folder / name).is_file() for name in ASSET_FILES) else None


def install(app: FastAPI) -> None:
    folder = assets_dir()
    title = f"{app.title} - API"
    if folder is not None:
        app.mount(ASSETS, StaticFiles(directory=folder), name="docs-assets")

    def missing() -> HTMLResponse:
        return HTMLResponse(
            "<p>The API documentation assets are not installed (pip package <code>fastapi-offline</code>); "
            f'the OpenAPI document is at <a href="{app.openapi_url}">{app.openapi_url}</a>.</p>',
            status_code=503,
        )

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        if folder is None:
            return missing()
        return get_swagger_ui_html(
            openapi_url=str(app.openapi_url),
            title=title,
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        if folder is None:
            return missing()
        return get_redoc_html(
            openapi_url=str(app.openapi_url),
            title=title,
            redoc_js_url=f"{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
