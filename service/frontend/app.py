"""The composition root: one ASGI application from the data plane and every protocol, wired in one place.

Each protocol module (service/frontend/protocols/) turns the neutral data plane into its routes: hot routes,
which :class:`~service.frontend.routing.Front` matches and the kit runs, and FastAPI routes for everything else.
Protocols never import each other or this module. The error table's handlers, the offline /docs, the probes,
and the gRPC server (started and stopped with the HTTP server by the lifecycle) are attached here too. To add a
protocol: write its module with a ``routes(settings, plane) -> Routes`` function and add it to ``PROTOCOLS``
(docs/SERVICE.md walks through it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.config import Settings
from service.core import DataPlane
from service.docs_assets import add_offline_docs
from service.errors import ServeError
from service.frontend import health
from service.frontend.kit import Kit, error_response
from service.frontend.lifecycle import Lifecycle
from service.frontend.protocols import native, tei, v2_grpc, v2_http, vllm
from service.frontend.routing import Front
from service.metrics import Metrics
from service.tracing import Tracing

log = logging.getLogger("bertserve.api")

# In this order: FastAPI matches its routes in the order they were added.
PROTOCOLS = (native, v2_http, tei, vllm)


def create_app(
    settings: Settings, plane: DataPlane, metrics: Metrics, lifecycle: Lifecycle, tracing: Tracing | None = None
) -> Front:
    """The whole HTTP application over a data plane; ``lifecycle`` runs at start-up and shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await lifecycle.startup()
        yield
        await lifecycle.shutdown()

    api = FastAPI(
        title="bertserve",
        version=__version__,
        summary="BERT text classification with dynamic batching: native API, Open Inference Protocol v2 "
        "(HTTP and gRPC), TEI and vLLM classification dialects",
        lifespan=lifespan,
        docs_url=None,
    )
    kit = Kit(settings, metrics, tracing)
    front = Front(kit, api)
    register_errors(api, kit)
    add_offline_docs(api)
    api.include_router(health.router(settings, plane, metrics))
    for protocol in PROTOCOLS:
        routes = protocol.routes(settings, plane)
        for route in routes.hot:
            front.add(route)
        if routes.router is not None:
            api.include_router(routes.router)
        front.document(routes.schemas)
    if settings.grpc_listen_port:
        grpc = v2_grpc.GrpcServer(settings, plane, kit)
        lifecycle.hooks.append((grpc.start, grpc.stop))
    return front


def register_errors(api: FastAPI, kit: Kit) -> None:
    """The error table for FastAPI's routes: the native error shape, counted as the hot routes count."""

    async def serve_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, ServeError):  # pragma: no cover - registered for ServeError only
            raise exc
        kit.reject(exc.reason)
        return error_response(request, exc.message, exc.type, exc.status, exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, StarletteHTTPException):  # pragma: no cover
            raise exc
        return error_response(request, str(exc.detail), "http_error", exc.status_code, exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, RequestValidationError):  # pragma: no cover
            raise exc
        kit.reject("invalid")
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in exc.errors()[:5]]
        return error_response(request, "; ".join(parts), "validation_error", 422)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(request, "internal server error", "internal_error", 500)

    api.add_exception_handler(ServeError, serve_error)
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, unexpected)
