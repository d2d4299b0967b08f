"""`python -m service`: settings -> processes -> serve.

One API process (the default): the engine runs in this process and a request is a method call away from the
batcher. With ``--api-workers N`` (N > 1) this process becomes a supervisor: it starts one engine process per
device (service/ipc.py) and N API processes that share the HTTP and gRPC ports (SO_REUSEPORT), and stops
everything with a clear message if any of them dies (no silent half-alive state). SIGTERM drains: see
service/frontend/lifecycle.py.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

# The service's parallelism comes from requests (API processes, inference threads); the tokenizer's own rayon
# pool only competes with them for the same cores. Measured on the tiny bundle, one API process, c=64: 4,592
# req/s with it, 5,376 without (loop CPU per request the same, the pool's threads 0.088 -> 0.061 ms). The
# variable is read when the tokenizer first runs, so set it before anything tokenizes; a user's value wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# ONNX Runtime's official Linux builds (1.29+) initialise Microsoft's 1DS telemetry on import: a device id written
# under ~/.cache (a warning on a read-only root filesystem) and events for upload. A server, often air-gapped,
# sends nothing anywhere unless its operator says so; ORT reads the variable at import, so set it first.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import uvicorn

from service.config import Settings, parse_args
from service.core import DataPlane, EngineClient, LocalEngine
from service.engine import Engine
from service.frontend.app import create_app
from service.frontend.lifecycle import DrainingServer, GracefulHttpToolsProtocol, Lifecycle
from service.logs import configure_logging
from service.metrics import Metrics
from service.tracing import Tracing, setup_tracing

log = logging.getLogger("bertserve")


def monitor_factory(settings: Settings, metrics: Metrics) -> Any:
    """PredictionMonitor per model (prediction metrics and drift), registered with this process's metrics."""
    from service.monitoring import PredictionMonitor

    if not settings.monitoring:
        return None

    def make(bundle: Any, head: Any) -> Any:
        registry = None if metrics.multiprocess else metrics.registry
        reference = getattr(bundle.manifest, "reference", None)
        return PredictionMonitor(
            registry,
            bundle.manifest.name,
            list(head.labels),
            reference,
            window=settings.drift_window,
            window_s=settings.drift_window_s,
            low_margin=settings.low_margin,
        )

    return make


def serve(
    settings: Settings,
    plane: DataPlane,
    metrics: Metrics,
    lifecycle: Lifecycle,
    tracing: Tracing,
    sockets: Any = None,
) -> int:
    """Run the HTTP (and gRPC) front end until drained; the exit status."""
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
        # Nothing reads the client address or scheme (no URL is built from them, logs carry request ids), so
        # uvicorn's X-Forwarded-* middleware only cost a layer per request; and no "server: uvicorn" header.
        # Measured together, alternated (tiny bundle, c=64): 1.07x requests/s at 1 text, 1.04x at 8 (medians).
        proxy_headers=False,
        server_header=False,
    )
    server = DrainingServer(config, plane, settings.drain_delay_s)
    lifecycle.on_fatal = server.fail
    try:
        server.run(sockets=sockets)
    except SystemExit as exc:  # start-up failure raised in the lifespan
        return int(exc.code or 2) if isinstance(exc.code, int) else 2
    finally:
        tracing.shutdown()  # flush the spans of the last requests
    if not server.started or server.failed:
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        settings: Settings = parse_args(argv)
    except Exception as exc:  # pydantic's message names the bad setting
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    secrets = settings.secrets()
    configure_logging(settings.log_level, settings.log_format, secrets)
    if settings.api_workers > 1:
        from service.ipc import supervise

        return supervise(settings)
    metrics = Metrics()
    tracing = setup_tracing()
    engine = Engine(settings, metrics, monitor_factory(settings, metrics), tracing)
    try:  # verify the bundle(s) and create the sessions before listening: a bad bundle never serves
        engine.prepare()
    except Exception as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return 2
    client: EngineClient = LocalEngine(engine)
    plane = DataPlane(settings, client, metrics)
    return serve(settings, plane, metrics, Lifecycle(plane, engine), tracing)


if __name__ == "__main__":
    sys.exit(main())
