"""The service's own probes: liveness, readiness and the Prometheus exposition (open unless ``auth_all``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.config import Settings
from service.core import DataPlane
from service.frontend.kit import error_docs, error_response, guard, json_response
from service.metrics import CONTENT_TYPE, Metrics


def router(settings: Settings, plane: DataPlane, metrics: Metrics) -> APIRouter:
    routes = APIRouter(tags=["health"])
    probe_docs = error_docs(401) if settings.auth_all else {}

    @routes.get("/healthz", responses=probe_docs)
    async def healthz(request: Request) -> Response:
        """Liveness: 200 while the process can answer."""
        guard(request, settings)
        return json_response({"status": "alive"})

    @routes.get("/readyz", responses={**probe_docs, **error_docs(503)})
    async def readyz(request: Request) -> Response:
        """Readiness: 200 once every model is loaded and warm; 503 while loading or draining."""
        guard(request, settings)
        if plane.draining:
            return error_response(request, "server is draining", "draining", 503)
        if not plane.ready:
            return error_response(request, "model is loading or warming up", "not_ready", 503)
        return json_response({"status": "ready"})

    @routes.get("/metrics", response_class=Response, responses=probe_docs)
    async def metrics_route(request: Request) -> Response:
        """Prometheus exposition of every bertserve_* series (all processes merged)."""
        guard(request, settings)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return routes
