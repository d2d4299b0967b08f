"""/docs works offline: Swagger UI from the installed package, rendered by a real headless browser, no network.

The app is served by uvicorn on 127.0.0.1 and opened in Debian's chromium with every non-loopback request sent
to a proxy that does not exist (127.0.0.1:9), so a page that needed a CDN would stay blank. The control case,
FastAPI's default CDN page under the same browser, shows that it does: without the bundled assets no operation
is listed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from service.docs_assets import add_offline_docs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Texts(BaseModel):
    inputs: list[str]


def make_app(offline: bool) -> FastAPI:
    app = FastAPI(title="docs check", docs_url=None if offline else "/docs")

    @app.post("/v1/predict", summary="classify texts")
    def predict(body: Texts) -> dict[str, int]:
        return {"n": len(body.inputs)}

    @app.get("/v1/models", summary="list models")
    def models() -> list[str]:
        return ["tiny"]

    if offline:
        add_offline_docs(app)
    return app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def serve() -> Iterator[Callable[[FastAPI], str]]:
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: FastAPI) -> str:
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def rendered_dom(url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran, in headless chromium with no route off this machine."""
    assert CHROMIUM is not None
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--proxy-server=http://127.0.0.1:9",  # nothing listens there: every external fetch fails
        "--proxy-bypass-list=127.0.0.1",
        "--virtual-time-budget=8000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_docs_page_and_assets_come_from_this_server() -> None:
    """In process, milliseconds: the page names no CDN, the assets and the 3.0-labelled schema are served."""
    from fastapi.testclient import TestClient

    client = TestClient(make_app(offline=True))
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn." not in page.text and "/docs-static/swagger-ui-bundle.js" in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert client.get(f"/docs-static/{asset}").status_code == 200
    schema = client.get("/docs-static/openapi.json").json()
    assert schema["openapi"] == "3.0.3" and set(schema["paths"]) == {"/v1/predict", "/v1/models"}
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")  # clients still get the real one
    assert "/docs" not in client.get("/openapi.json").json()["paths"]


def test_refuses_an_app_that_already_has_docs() -> None:
    with pytest.raises(ValueError, match="docs_url=None"):
        add_offline_docs(FastAPI())


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/test-deps.sh installs it as root)")
def test_docs_lists_the_operations_without_network(serve: Callable[[FastAPI], str], tmp_path: Path) -> None:
    offline_url = serve(make_app(offline=True))
    dom = rendered_dom(f"{offline_url}/docs", tmp_path / "offline")
    assert "swagger-ui" in dom and "opblock-summary-path" in dom, dom[-2000:]
    for path, summary in (("/v1/predict", "classify texts"), ("/v1/models", "list models")):
        assert f'data-path="{path}"' in dom, f"{path} not listed in the rendered /docs"
        assert summary in dom

    cdn_url = serve(make_app(offline=False))
    control = rendered_dom(f"{cdn_url}/docs", tmp_path / "cdn")
    assert "opblock-summary-path" not in control, "the CDN page rendered: this browser is not offline"
