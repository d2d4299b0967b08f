"""The ASGI application: hot routes dispatched below the framework, FastAPI for everything else.

``POST /v1/predict`` and ``POST /v2/models/{m}[/versions/{v}]/infer`` (and the dialect routes) are matched by
:class:`Front` with a dict lookup or a prefix test and run by the shared kit (service/frontend/http.py);
every other path goes to the FastAPI app, which also declares the hot routes so that the OpenAPI document
and /docs describe them (requests reaching those declarations are delegated to the same handlers).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from service.config import Settings
from service.core import DataPlane
from service.errors import BadRequest, Forbidden, NotReady, ServeError, Unprocessable
from service.frontend import native, v2
from service.frontend.http import Handler, Kit, authorize, call_captured
from service.frontend.lifecycle import Lifecycle
from service.logs import new_request_id, valid_request_id
from service.metrics import CONTENT_TYPE, Metrics
from service.schemas import ErrorResponse, PredictRequest, PredictResponse, ReloadRequest
from service.tracing import Tracing

log = logging.getLogger("bertserve.api")

ERROR_DOCS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "invalid JSON",
        401: "missing or wrong API key",
        404: "unknown model or version",
        413: "too many inputs or too large a body",
        415: "not JSON",
        422: "invalid fields or a text too long with truncate=false",
        429: "queue full (see Retry-After)",
        503: "loading or draining",
        504: "deadline passed",
    }.items()
}


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def request_id_of(request: Request) -> str:
    """The client's X-Request-ID when it is acceptable, else a new one (the hot routes do the same)."""
    given = request.headers.get("x-request-id", "")
    return given if given and valid_request_id(given) else new_request_id()


def error_response(
    request: Request, message: str, kind: str, status: int, headers: Mapping[str, str] | None = None
) -> Response:
    """The native error shape, ``{"error", "type", "request_id"}``, with the id also as a header."""
    rid = request_id_of(request)
    return json_response(
        {"error": message, "type": kind, "request_id": rid}, status, {**(headers or {}), "x-request-id": rid}
    )


class Front:
    """The ASGI entry point: hot routes here, the rest to FastAPI."""

    def __init__(self, kit: Kit, api: FastAPI) -> None:
        self.kit = kit
        self.api = api
        self.exact: dict[tuple[str, str], tuple[str, Handler]] = {}
        self.v2_infer = v2.infer_handler(kit.plane)
        # FastAPI's attributes that tests and tooling read (state, openapi, routes) stay reachable
        self.state = api.state

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.exact[(method, path)] = (path, handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            hit = self.exact.get((scope["method"], scope["path"]))
            if hit is not None:
                await self.kit.serve(hit[0], hit[1], scope, receive, send)
                return
            params = match_v2_infer(scope)
            if params is not None:
                endpoint = (
                    "/v2/models/{name}/versions/{version}/infer" if "version" in params else "/v2/models/{name}/infer"
                )
                await self.kit.serve(endpoint, self.v2_infer, scope, receive, send, params)
                return
        await self.api(scope, receive, send)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)


def match_v2_infer(scope: Scope) -> dict[str, str] | None:
    """``POST /v2/models/{name}[/versions/{version}]/infer`` -> path parameters, else None."""
    if scope["method"] != "POST":
        return None
    path: str = scope["path"]
    if not (path.startswith("/v2/models/") and path.endswith("/infer")):
        return None
    parts = path[len("/v2/models/") : -len("/infer")].split("/")
    if len(parts) == 1 and parts[0]:
        return {"name": parts[0]}
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return {"name": parts[0], "version": parts[2]}
    return None


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
        version="0.2.0",
        summary="BERT text classification with dynamic batching: native API, Open Inference Protocol v2 "
        "(HTTP and gRPC), TEI and vLLM classification dialects",
        lifespan=lifespan,
        docs_url=None,
    )
    api.state.plane = plane
    api.state.lifecycle = lifecycle
    kit = Kit(settings, plane, metrics, tracing)
    front = Front(kit, api)
    register_errors(api, metrics)
    add_offline_docs(api)
    add_health_routes(api, settings, plane, metrics)
    predict = native.predict_handler(plane)
    front.route("POST", "/v1/predict", predict)
    add_native_routes(api, settings, plane, kit, predict)
    add_v2_routes(api, settings, plane, kit, front.v2_infer)
    add_protocol_extensions(api, front, settings, plane, kit)
    return front


def add_offline_docs(api: FastAPI) -> None:
    try:
        from service.docs_assets import add_offline_docs as add
    except ImportError:  # pragma: no cover - the module ships with the service
        return
    add(api)


def add_protocol_extensions(api: FastAPI, front: Front, settings: Settings, plane: DataPlane, kit: Kit) -> None:
    """Triton's extensions (and the KServe v2 gRPC server) and the TEI / vLLM dialects, each in its own module."""
    from service.frontend import dialects, triton

    triton.register(api, front, settings, plane, kit)
    dialects.register(api, front, settings, plane, kit)


def register_errors(api: FastAPI, metrics: Metrics) -> None:
    rejected = metrics.rejected

    async def serve_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, ServeError):  # pragma: no cover - registered for ServeError only
            raise exc
        if exc.reason:
            rejected.labels(exc.reason).inc()
        return error_response(request, exc.message, exc.type, exc.status, exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, StarletteHTTPException):  # pragma: no cover
            raise exc
        return error_response(request, str(exc.detail), "http_error", exc.status_code, exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, RequestValidationError):  # pragma: no cover
            raise exc
        rejected.labels("invalid").inc()
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in exc.errors()[:5]]
        return error_response(request, "; ".join(parts), "validation_error", 422)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(request, "internal server error", "internal_error", 500)

    api.add_exception_handler(ServeError, serve_error)
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, unexpected)


def add_health_routes(api: FastAPI, settings: Settings, plane: DataPlane, metrics: Metrics) -> None:
    probe_docs: dict[int | str, dict[str, Any]] = {401: ERROR_DOCS[401]} if settings.auth_all else {}

    def guard(request: Request) -> None:
        if settings.auth_all:
            authorize(dict(request.scope["headers"]), settings)

    @api.get("/healthz", tags=["health"], responses=probe_docs)
    async def healthz(request: Request) -> Response:
        """Liveness: 200 while the process can answer."""
        guard(request)
        return json_response({"status": "alive"})

    @api.get("/readyz", tags=["health"], responses={503: ERROR_DOCS[503]})
    async def readyz(request: Request) -> Response:
        """Readiness: 200 once every model is loaded and warm; 503 while loading or draining."""
        guard(request)
        if plane.draining:
            return error_response(request, "server is draining", "draining", 503)
        if not plane.ready:
            return error_response(request, "model is loading or warming up", "not_ready", 503)
        return json_response({"status": "ready"})

    @api.get("/metrics", tags=["health"], response_class=Response)
    async def metrics_route(request: Request) -> Response:
        """Prometheus exposition of every bertserve_* series (all processes merged)."""
        guard(request)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)


def delegate(kit: Kit, endpoint: str, handler: Handler) -> Any:
    """A FastAPI endpoint running a hot handler, so that the OpenAPI document describes the hot route.

    Requests normally never reach it (Front answers them first). Its signature is what FastAPI documents:
    the request, plus the path's own parameters, and nothing else.
    """

    async def run(request: Request) -> Response:
        status, headers, body = await call_captured(
            lambda send: kit.serve(endpoint, handler, request.scope, request.receive, send, request.path_params)
        )
        return Response(
            body, status_code=status, headers={k.decode(): v.decode() for k, v in headers if k != b"content-length"}
        )

    if "{version}" in endpoint:

        async def with_version(request: Request, name: str, version: str) -> Response:
            return await run(request)

        return with_version
    if "{name}" in endpoint:

        async def with_name(request: Request, name: str) -> Response:
            return await run(request)

        return with_name
    return run


def add_native_routes(api: FastAPI, settings: Settings, plane: DataPlane, kit: Kit, predict: Handler) -> None:
    predict_route = delegate(kit, "/v1/predict", predict)
    api.add_api_route(
        "/v1/predict",
        predict_route,
        methods=["POST"],
        tags=["inference"],
        summary="Classify one text, a list of texts, or text pairs",
        response_model=PredictResponse,
        responses={k: v for k, v in ERROR_DOCS.items() if k != 401 or settings.api_key},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
    )

    @api.get("/v1/models", tags=["models"], responses={503: ERROR_DOCS[503]})
    async def models() -> Response:
        """What is being served: labels, task, limits, the providers really in use, batching, metrics."""
        if not plane.ready:
            plane.model(None)
        documents = native.models_document(plane)
        top = documents[0] if len(documents) == 1 else {}
        return json_response({**top, "models": documents})

    reload_docs: dict[int | str, dict[str, Any]] = {k: ERROR_DOCS[k] for k in (400, 401, 413, 422, 503)}
    reload_docs[403] = {"model": ErrorResponse, "description": "no API key configured"}
    reload_docs[409] = {"model": ErrorResponse, "description": "a reload is in progress"}

    @api.post(
        "/v1/admin/reload",
        tags=["admin"],
        responses=reload_docs,
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": ReloadRequest.model_json_schema()}}}},
    )
    async def admin_reload(request: Request) -> Response:
        """Load a bundle (default: the configured directory), warm it, swap it in; protected by the API key."""
        if settings.admin_key is None:
            raise Forbidden("the admin API is disabled; set BERTSERVE_ADMIN_API_KEY or BERTSERVE_API_KEY to enable it")
        authorize(dict(request.scope["headers"]), settings, admin=True)
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            from service.errors import PayloadTooLarge

            raise PayloadTooLarge(f"request body exceeds the limit of {settings.max_body_bytes} bytes")
        payload: Any = {}
        if raw.strip():
            try:
                payload = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise Unprocessable('body: expected {"model_dir": DIR or null, "variant": str or null}')
        extra = sorted(set(payload) - {"model_dir", "variant"})
        if extra:
            raise Unprocessable("; ".join(f"{k}: Extra inputs are not permitted" for k in extra[:5]))
        for key in ("model_dir", "variant"):
            if payload.get(key) is not None and not isinstance(payload[key], str):
                raise Unprocessable(f"{key}: expected a string or null")
        if plane.draining:
            raise NotReady("server is draining")
        desc = await plane.engine.reload(payload.get("model_dir"), payload.get("variant"))
        return json_response(
            {"name": desc.name, "version": desc.version, "variant": desc.variant, "providers": desc.providers}
        )


def add_v2_routes(api: FastAPI, settings: Settings, plane: DataPlane, kit: Kit, infer: Handler) -> None:
    def guard(request: Request) -> None:
        if settings.auth_all:
            authorize(dict(request.scope["headers"]), settings)

    @api.get("/v2", tags=["v2"])
    async def server_metadata() -> Response:
        return json_response({"name": "bertserve", "version": api.version, "extensions": extensions(api)})

    @api.get("/v2/health/live", tags=["v2"])
    async def live(request: Request) -> Response:
        guard(request)
        return json_response({"live": True})

    @api.get("/v2/health/ready", tags=["v2"], responses={503: ERROR_DOCS[503]})
    async def ready(request: Request) -> Response:
        guard(request)
        if not plane.ready:
            return error_response(request, "server is not ready", "not_ready", 503)
        return json_response({"ready": True})

    @api.get("/v2/models/{name}", tags=["v2"], responses={404: ERROR_DOCS[404], 503: ERROR_DOCS[503]})
    async def metadata(name: str) -> Response:
        return json_response(v2.model_metadata(plane.model(name)))

    @api.get("/v2/models/{name}/versions/{version}", tags=["v2"], responses={404: ERROR_DOCS[404]})
    async def metadata_version(name: str, version: str) -> Response:
        return json_response(v2.model_metadata(plane.model(name, version)))

    @api.get("/v2/models/{name}/ready", tags=["v2"], responses={404: ERROR_DOCS[404], 503: ERROR_DOCS[503]})
    async def model_ready(name: str) -> Response:
        plane.model(name)
        return json_response({"name": name, "ready": True})

    @api.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"], responses={404: ERROR_DOCS[404]})
    async def model_version_ready(name: str, version: str) -> Response:
        plane.model(name, version)
        return json_response({"name": name, "ready": True})

    doc: dict[str, Any] = {
        "methods": ["POST"],
        "tags": ["v2"],
        "responses": {k: v for k, v in ERROR_DOCS.items() if k != 415},
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["inputs"],
                            "properties": {
                                "id": {"type": "string"},
                                "parameters": {"type": "object"},
                                "inputs": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {"type": "object", "required": ["name", "shape", "datatype"]},
                                },
                                "outputs": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                            },
                        }
                    }
                },
            }
        },
    }
    api.add_api_route("/v2/models/{name}/infer", delegate(kit, "/v2/models/{name}/infer", infer), **doc)
    api.add_api_route(
        "/v2/models/{name}/versions/{version}/infer",
        delegate(kit, "/v2/models/{name}/versions/{version}/infer", infer),
        **doc,
    )


def extensions(api: FastAPI) -> list[str]:
    """The v2 extensions this server implements (protocol modules add theirs to ``api.state.extensions``)."""
    return ["binary_tensor_data", "classification", *getattr(api.state, "extensions", [])]
