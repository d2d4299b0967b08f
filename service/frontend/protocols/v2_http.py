"""The Open Inference Protocol over HTTP, as Triton speaks it: health, server and model metadata, infer (a hot
route; JSON or Triton's binary tensor data), and Triton's extensions that its tools read first (``perf_analyzer``
asks for ``/config`` before anything else): model configuration, statistics, the model repository (admin key).

Every document and the request/response codec are openinference.py's, shared with the gRPC transport.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import __version__
from service.config import Settings
from service.core import DataPlane
from service.errors import BadRequest
from service.frontend import openinference as oip
from service.frontend.kit import (
    Ctx,
    ErrorResponse,
    HotRoute,
    Reply,
    Routes,
    authorize,
    body_schema,
    convert,
    error_docs,
    error_response,
    guard,
    json_response,
    loads,
    operation,
    read_body,
)

HEADER_LENGTH = b"inference-header-content-length"
T = TypeVar("T", bound=msgspec.Struct)


class RepositoryIndexRequest(msgspec.Struct, forbid_unknown_fields=True):
    ready: bool = False  # only the models that are ready


class RepositoryModelRequest(msgspec.Struct, forbid_unknown_fields=True):
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)  # accepted, as Triton's; none is used


def split_body(headers: dict[bytes, bytes], body: bytes) -> tuple[bytes, bytes]:
    """The JSON header and the binary section of a binary-tensor request (Inference-Header-Content-Length)."""
    header_length = headers.get(HEADER_LENGTH)
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequest(f"invalid Inference-Header-Content-Length {header_length.decode('latin-1')!r}")
    cut = int(header_length)
    return body[:cut], body[cut:]


def routes(settings: Settings, plane: DataPlane) -> Routes:
    limit = plane.limits.max_body_bytes

    async def infer(ctx: Ctx) -> Reply:
        authorize(ctx.headers, settings)
        view = plane.model(ctx.params["name"], ctx.params.get("version"))
        json_part, binary = split_body(ctx.headers, await read_body(ctx.receive, ctx.headers, limit))
        req = convert(loads(json_part, "inference request"), oip.InferenceRequest)
        texts, pairs = oip.parse_inputs(req, binary, view)
        requested = oip.requested_outputs(req)
        truncate, timeout = oip.infer_options(req)
        result = await plane.infer(view, texts, pairs, ctx.call, truncate=truncate, timeout_s=timeout)
        binary_default = bool(req.parameters.get("binary_data_output", False))
        header, chunks = oip.encode_outputs(req, result, requested, binary_default)
        head = orjson.dumps(header)
        if not chunks:
            return Reply(head, timed=True)
        return Reply(
            head + chunks,
            headers=[(HEADER_LENGTH, b"%d" % len(head))],
            content_type=b"application/octet-stream",
            timed=True,
        )

    ok = {"content": {"application/json": {"schema": body_schema(oip.InferenceResponse)}}}
    errors = error_docs(400, 401, 404, 413, 422, 429, 503, 504)
    summary = "Inference (JSON or binary tensor data)"
    hot = [
        HotRoute("POST", path, infer, operation(summary, "v2", oip.InferenceRequest, ok, errors, names))
        for path, names in (
            ("/v2/models/{name}/infer", ("name",)),
            ("/v2/models/{name}/versions/{version}/infer", ("name", "version")),
        )
    ]

    router = APIRouter(tags=["v2"])
    found = error_docs(404, 503)

    @router.get("/v2")
    async def server_metadata() -> Response:
        return json_response({"name": "bertserve", "version": __version__, "extensions": list(oip.EXTENSIONS)})

    @router.get("/v2/health/live")
    async def live(request: Request) -> Response:
        guard(request, settings)
        return json_response({"live": True})

    @router.get("/v2/health/ready", responses=error_docs(503))
    async def ready(request: Request) -> Response:
        guard(request, settings)
        if not plane.ready:
            return error_response(request, "server is not ready", "not_ready", 503)
        return json_response({"ready": True})

    @router.get("/v2/models/stats")  # before /v2/models/{name}, which would take "stats" for a model name
    async def all_stats(request: Request) -> Response:
        """Triton's statistics extension: every served model version."""
        guard(request, settings)
        return json_response(oip.statistics(await plane.statistics(None, None)))

    @router.get("/v2/models/{name}", responses=found)
    async def metadata(name: str) -> Response:
        return json_response(oip.model_metadata(plane.model(name)))

    @router.get("/v2/models/{name}/versions/{version}", responses=found)
    async def metadata_version(name: str, version: str) -> Response:
        return json_response(oip.model_metadata(plane.model(name, version)))

    @router.get("/v2/models/{name}/ready", responses=found)
    async def model_ready(name: str) -> Response:
        plane.model(name)
        return json_response({"name": name, "ready": True})

    @router.get("/v2/models/{name}/versions/{version}/ready", responses=found)
    async def model_version_ready(name: str, version: str) -> Response:
        plane.model(name, version)
        return json_response({"name": name, "ready": True})

    @router.get("/v2/models/{name}/config", responses=found)
    async def config(name: str) -> Response:
        """Triton's model configuration (what perf_analyzer reads first)."""
        return json_response(oip.model_config(plane.model(name), settings))

    @router.get("/v2/models/{name}/versions/{version}/config", responses=found)
    async def config_version(name: str, version: str) -> Response:
        return json_response(oip.model_config(plane.model(name, version), settings))

    @router.get("/v2/models/{name}/stats", responses=found)
    async def stats(request: Request, name: str) -> Response:
        guard(request, settings)
        return json_response(oip.statistics(await plane.statistics(name, None)))

    @router.get("/v2/models/{name}/versions/{version}/stats", responses=found)
    async def stats_version(request: Request, name: str, version: str) -> Response:
        guard(request, settings)
        return json_response(oip.statistics(await plane.statistics(name, version)))

    async def admin_body(request: Request, schema: type[T]) -> T:
        """Authorize with the admin key, then the optional JSON body of a repository call (Triton answers 400
        for every bad body)."""
        headers = dict(request.scope["headers"])
        authorize(headers, settings, admin=True)
        raw = await read_body(request.receive, headers, limit)
        return convert(loads(raw), schema, invalid=BadRequest) if raw.strip() else schema()

    admin = error_docs(400, 401, 404, 409, 422)
    index_body = {"requestBody": {"content": {"application/json": {"schema": body_schema(RepositoryIndexRequest)}}}}
    model_body = {"requestBody": {"content": {"application/json": {"schema": body_schema(RepositoryModelRequest)}}}}

    @router.post("/v2/repository/index", responses=admin, openapi_extra=index_body)
    async def index(request: Request) -> Response:
        """Triton's repository index: every model in the repository, its state and why; admin key."""
        body = await admin_body(request, RepositoryIndexRequest)
        return json_response(oip.repository_index(await plane.repository_index(body.ready)))

    @router.post("/v2/repository/models/{name}/load", responses=admin, openapi_extra=model_body)
    async def load(request: Request, name: str) -> Response:
        """Load (or reload) every served version of a repository model; admin key."""
        await admin_body(request, RepositoryModelRequest)
        await plane.load(name)
        return Response(status_code=200)

    @router.post("/v2/repository/models/{name}/unload", responses=admin, openapi_extra=model_body)
    async def unload(request: Request, name: str) -> Response:
        """Stop serving a model: what was admitted is answered first; admin key."""
        await admin_body(request, RepositoryModelRequest)
        await plane.unload(name)
        return Response(status_code=200)

    schemas: tuple[type[msgspec.Struct], ...] = (
        *oip.SCHEMAS,
        RepositoryIndexRequest,
        RepositoryModelRequest,
        ErrorResponse,
    )
    return Routes(hot, router, schemas)
