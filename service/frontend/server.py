"""Run the front end: uvicorn (uvloop, httptools, one write per response) with the drain-aware server, until
drained. The exit status: 0 after a drain, 2 when start-up failed."""

from __future__ import annotations

from typing import Any

import uvicorn

from service.config import Settings
from service.core import DataPlane
from service.frontend.app import create_app
from service.frontend.lifecycle import DrainingServer, GracefulHttpToolsProtocol, Lifecycle
from service.metrics import Metrics
from service.tracing import Tracing


def serve(settings: Settings, plane: DataPlane, metrics: Metrics, tracing: Tracing, sockets: Any = None) -> int:
    """Serve HTTP (and gRPC) over ``plane`` until SIGTERM has drained it; ``sockets`` to listen on shared ones."""
    lifecycle = Lifecycle(plane)
    app = create_app(settings, plane, metrics, lifecycle, tracing)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=GracefulHttpToolsProtocol,
        log_level=settings.log_level,
        access_log=False,  # the kit's access log covers the hot routes; uvicorn's would cost CPU per request
        log_config=None,  # keep service.logs' handlers and formats
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
        timeout_keep_alive=max(1, round(settings.keep_alive_s)),
        lifespan="on",
        # Nothing reads the client address or scheme (no URL is built from them, logs carry request ids): no
        # X-Forwarded-* middleware layer per request, and no "server: uvicorn" header.
        proxy_headers=False,
        server_header=False,
    )
    server = DrainingServer(config, plane, settings.drain_delay_s)
    lifecycle.on_fatal = server.fail
    try:
        server.run(sockets=sockets)
    except SystemExit:  # uvicorn exits on a start-up failure (a port in use, say): "cannot start", as elsewhere
        return 2
    finally:
        tracing.shutdown()  # flush the spans of the last requests
    if not server.started or server.failed:
        return 2
    return 0
