"""Interactive API docs that work offline: Swagger UI served from the installed ``swagger-ui-bundle`` package.

FastAPI's default ``/docs`` page loads Swagger UI's JavaScript and CSS from a public CDN, so in an air-gapped
cluster (where serving systems often run) the page stays blank. :func:`add_offline_docs` serves the same UI from
the ``swagger_ui_bundle`` package, a runtime dependency installed with the service, under ``/docs-static``, and
registers ``/docs`` to use it. The app must be created with ``docs_url=None`` (FastAPI would otherwise register
its CDN page at ``/docs`` first, and the first route wins).

The bundled Swagger UI is 4.15, which renders OpenAPI 3.0 documents only and refuses FastAPI's ``openapi:
3.1.0`` with "no valid version field". The page therefore reads ``/docs-static/openapi.json``: the app's own
schema, unchanged except for that version field, which 4.x then renders (the constructs FastAPI emits, such as
``anyOf`` with ``null``, display correctly). ``/openapi.json`` itself stays 3.1 for clients and generators.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

STATIC_PREFIX = "/docs-static"
SWAGGER_UI_RENDERS = "3.0.3"  # the newest OpenAPI version the bundled Swagger UI 4.x accepts


def _for_swagger_ui(schema: dict[str, Any]) -> dict[str, Any]:
    """The app's OpenAPI schema with the version field Swagger UI 4.x accepts (everything else unchanged)."""
    version = str(schema.get("openapi", ""))
    return schema | {"openapi": SWAGGER_UI_RENDERS} if version.startswith("3.1") else schema


def add_offline_docs(app: FastAPI, docs_url: str = "/docs", static_prefix: str = STATIC_PREFIX) -> None:
    """Serve Swagger UI's assets from the installed package and register ``docs_url`` to use them.

    Needs ``FastAPI(docs_url=None)``; raises ValueError when the app already has a route at ``docs_url``.
    """
    if any(getattr(route, "path", None) == docs_url for route in app.router.routes):
        raise ValueError(f"{docs_url} is already routed: create the app with FastAPI(docs_url=None)")
    schema_url = f"{static_prefix}/openapi.json"

    # routes are matched in order: this one goes before the static mount below, which would answer it with 404
    @app.get(schema_url, include_in_schema=False)
    def swagger_ui_schema() -> JSONResponse:
        return JSONResponse(_for_swagger_ui(app.openapi()))

    @app.get(docs_url, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=schema_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{static_prefix}/swagger-ui-bundle.js",
            swagger_css_url=f"{static_prefix}/swagger-ui.css",
            swagger_favicon_url=f"{static_prefix}/favicon-32x32.png",
        )

    app.mount(static_prefix, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui-static")
