"""The shared HTTP kit: what every protocol's routes have in common, and the one serve path of the hot routes.

A hot route (``POST /v1/predict``, v2 infer, the TEI and vLLM routes) is a :class:`HotRoute`: a plain ASGI
handler ``async (Ctx) -> Reply`` with its error shape and its OpenAPI operation, declared once. :meth:`Kit.serve`
runs it and owns everything hot routes share: request id, the error table (each protocol only chooses the shape
of its error body), per-request metrics (children bound once), the inflight gauge, the trace span, the access log
and the reply. Profiling showed the framework (routing, dependency injection, pydantic request models) cost
several times a request's own work at thousands of requests/s, so these routes bypass it; FastAPI serves every
other route and the OpenAPI document. gRPC (its own transport) shares the counting through :meth:`Kit.track`.

Request bodies are declared once, as msgspec Structs (hot and cold routes alike): the declaration validates and
is what the OpenAPI document shows. orjson parses (its messages for malformed
JSON), msgspec converts and validates in C, cheaper per request than the same checks written by hand.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from service.config import Settings
from service.core import Call, DataPlane, Timing
from service.errors import (
    BadRequest,
    Disconnected,
    PayloadTooLarge,
    ServeError,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from service.logs import log_access, new_request_id, request_id, valid_request_id
from service.metrics import Metrics
from service.tracing import Tracing

log = logging.getLogger("bertserve.http")

JSON = b"application/json"
T = TypeVar("T")

# -- what a hot route is --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Ctx:
    """One HTTP request as a hot handler sees it."""

    scope: Scope
    receive: Receive
    headers: dict[bytes, bytes]
    request_id: str
    call: Call  # its clock, disconnect probe and trace span, for the data plane
    params: dict[str, str] = field(default_factory=dict)  # path parameters


@dataclass(slots=True)
class Reply:
    body: bytes
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes = JSON
    timed: bool = False  # an inference reply: add the timing headers


Handler = Callable[[Ctx], Awaitable[Reply]]
ErrorShape = Callable[[ServeError, str], bytes]  # (error, request id) -> the protocol's error body


def native_error(exc: ServeError, rid: str) -> bytes:
    """The native error shape: ``{"error", "type", "request_id"}``."""
    return orjson.dumps({"error": exc.message, "type": exc.type, "request_id": rid})


@dataclass(frozen=True)
class HotRoute:
    """A route served below the framework, declared once: how it is matched, run, failed and documented."""

    method: str
    path: str  # "/v1/predict", or a template such as "/v2/models/{name}/infer"
    handler: Handler
    openapi: dict[str, Any]  # the OpenAPI operation object (summary, tags, requestBody, responses)
    error_shape: ErrorShape = native_error


# -- the one serve path ---------------------------------------------------------------------------------------


def probe(receive: Receive) -> Callable[[], bool] | None:
    """A cheap "has the client gone?" check: uvicorn's request cycle keeps a ``disconnected`` flag.

    Reading the flag costs nothing; waiting for an ``http.disconnect`` message would cost a task per request.
    Servers that keep no such flag get no probe (their requests are then dropped only by deadline).
    """
    cycle = getattr(receive, "__self__", None)
    if cycle is None or not hasattr(cycle, "disconnected"):
        return None
    return lambda: bool(cycle.disconnected)


class Kit:
    """Runs hot handlers: the one place a hot request is timed, counted, logged, answered or failed."""

    def __init__(self, settings: Settings, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tracing = tracing if tracing is not None and tracing.enabled else None
        self.metrics = metrics
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._rejected: dict[str, Any] = {}
        self._inflight = metrics.inflight
        self.access_log = settings.access_log

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request (HTTP or gRPC) in its endpoint's histogram and counter, children bound once."""
        pair = self._children.get((endpoint, status))
        if pair is None:
            pair = (
                self.metrics.request_duration.labels(endpoint, str(status)),
                self.metrics.requests.labels(endpoint, str(status)),
            )
            self._children[(endpoint, status)] = pair
        pair[0].observe(seconds)
        pair[1].inc()

    def reject(self, reason: str | None) -> None:
        """Count a refusal under its reason (errors.py's ``reason``; None: not a rejection)."""
        if reason is None:
            return
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = self.metrics.rejected.labels(reason)
        child.inc()

    @contextlib.contextmanager
    def track(self, endpoint: str, timing: Timing) -> Iterator[list[int]]:
        """For a transport with its own serve loop (gRPC): in flight while inside, then observed with the status
        the block left in the yielded one-element list."""
        status = [200]
        self._inflight.inc()
        try:
            yield status
        finally:
            self._inflight.dec()
            self.observe(endpoint, status[0], timing.total_s())

    async def serve(
        self, route: HotRoute, scope: Scope, receive: Receive, send: Send, params: dict[str, str] | None = None
    ) -> None:
        call = Call(Timing(), probe(receive))
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id")
        rid = given.decode("latin-1") if given is not None and valid_request_id(given.decode("latin-1")) else ""
        rid = rid or new_request_id()
        token = request_id.set(rid)
        endpoint = route.path
        if self.tracing is not None:
            call.span = self.tracing.request_span(
                f"{scope.get('method', '')} {endpoint}",
                scope["headers"],
                {"http.route": endpoint, "bertserve.request_id": rid},
            )
        ctx = Ctx(scope, receive, headers, rid, call, params or {})
        self._inflight.inc()
        try:
            try:
                reply = await route.handler(ctx)
            except ServeError as exc:
                self.reject(exc.reason)
                extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
                reply = Reply(route.error_shape(exc, rid), exc.status, extra)
            except Disconnected:  # counted where it was found; nothing to answer
                self.observe(endpoint, 499, call.timing.total_s())
                if call.span is not None:
                    call.span.end(499, "client went away")
                log.debug("client went away before its answer was ready")
                return
            except Exception:
                log.exception("unhandled error on %s", endpoint)
                reply = Reply(
                    orjson.dumps({"error": "internal server error", "type": "internal_error", "request_id": rid}), 500
                )
            out = [(b"content-type", reply.content_type), (b"content-length", b"%d" % len(reply.body))]
            out += reply.headers
            if reply.timed:
                out += call.timing.headers(rid)
            else:
                out.append((b"x-request-id", rid.encode()))
            await send({"type": "http.response.start", "status": reply.status, "headers": out})
            await send({"type": "http.response.body", "body": reply.body})
            seconds = call.timing.total_s()
            self.observe(endpoint, reply.status, seconds)
            if call.span is not None:
                call.span.end(reply.status, None if reply.status < 400 else str(reply.status))
            if call.gone is not None and reply.status < 300 and call.gone():
                self.reject("disconnected")  # computed, but nobody was there to read it
            if self.access_log:
                log_access(scope.get("method", ""), endpoint, reply.status, seconds * 1000)
        finally:
            self._inflight.dec()
            request_id.reset(token)


# -- bodies ---------------------------------------------------------------------------------------------------


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    """The whole body; 413 before reading when Content-Length is too large, or as soon as the stream is."""
    declared = headers.get(b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the common case: one message, no copy
        if message["type"] == "http.disconnect":
            raise Disconnected()
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_json_content_type(headers: dict[bytes, bytes]) -> None:
    content_type = headers.get(b"content-type", b"application/json").decode("latin-1")
    if content_type.split(";")[0].strip().lower() not in ("application/json", ""):
        raise UnsupportedMediaType(f"content type must be application/json, not {content_type!r}")


def loads(body: bytes, what: str = "request body") -> Any:
    if not body:
        raise BadRequest(f"{what} is not valid JSON: the body is empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")
_ROOT = re.compile(r"^Expected `object`, got `(?P<got>[^`]*)`$")


def validation_message(exc: msgspec.ValidationError, fields: Sequence[str] = ()) -> str:
    """msgspec's message as the API words errors: ``where: what`` (``inputs[1]: Expected `str`, got `null```);
    an unknown top-level field also names the ``fields`` there are."""
    match = _AT.match(str(exc))
    what, path = (match.group("what"), (match.group("path") or "").lstrip(".")) if match else (str(exc), "")
    prefix = f"{path}." if path else ""
    if unknown := _UNKNOWN.match(what):
        known = f"; the fields are {', '.join(fields)}" if fields and not path else ""
        return f"{prefix}{unknown.group('field')}: extra field, not permitted{known}"
    if missing := _MISSING.match(what):
        return f"{prefix}{missing.group('field')}: field required"
    if not path and (root := _ROOT.match(what)):
        return f"body: expected a JSON object, not {root.group('got')}"
    return f"{path or 'body'}: {what}"


def convert(payload: Any, schema: type[T], invalid: type[ServeError] = Unprocessable) -> T:
    """A parsed JSON value as the body's declared type; ``invalid`` (422) naming the field when it is not one."""
    try:
        return msgspec.convert(payload, schema)
    except msgspec.ValidationError as exc:
        raise invalid(validation_message(exc, getattr(schema, "__struct_fields__", ()))) from None


async def json_request(ctx: Ctx, settings: Settings, plane: DataPlane, schema: type[T]) -> T:
    """How every JSON inference route starts: the key, the content type, the body within the size limit, then
    readiness (503 with its reason before any 422 about the body), then the body as ``schema``."""
    authorize(ctx.headers, settings)
    check_json_content_type(ctx.headers)
    payload = loads(await read_body(ctx.receive, ctx.headers, plane.limits.max_body_bytes))
    if not plane.ready:
        plane.model(None)  # raises NotReady with the reason
    return convert(payload, schema)


def body_schema(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """The JSON schema of a body declaration, as the OpenAPI document's components refer to it."""
    return {"$ref": f"#/components/schemas/{struct.__name__}"}


# The text inputs the native API and TEI's share: one text, a list of texts, [a, b] (one pair, for pair models) or
# [[a, b], ...].
Inputs = str | list[str | tuple[str, str]]


def split_inputs(inputs: Inputs, pair_model: bool) -> tuple[list[str], list[str] | None, bool]:
    """(texts, second texts of pairs or None, whether one input was sent rather than a list)."""
    if isinstance(inputs, str):
        return [inputs], None, True
    if all(isinstance(t, str) for t in inputs):
        texts: list[str] = inputs  # type: ignore[assignment]
        if pair_model and len(texts) == 2:  # one pair
            return [texts[0]], [texts[1]], True
        return texts, None, False
    if all(isinstance(p, tuple) for p in inputs):
        return [p[0] for p in inputs], [p[1] for p in inputs], False
    raise Unprocessable("inputs: lists may hold only strings, or only pairs of strings [[a, b], ...]")


# -- auth -----------------------------------------------------------------------------------------------------


def authorize(headers: dict[bytes, bytes], settings: Settings, admin: bool = False) -> None:
    """Raise Unauthorized unless the request carries ``Authorization: Bearer <key>`` (when a key is set): the API
    key, or for ``admin`` calls (model repository, reload) the admin key."""
    key = settings.admin_key if admin else settings.api_key
    if key is None:
        return
    check_token(headers.get(b"authorization", b"").decode("latin-1"), key)


def check_token(header: str, key: SecretStr | None) -> None:
    """Constant-time comparison of a ``Bearer`` header (HTTP) or metadata value (gRPC) with ``key``."""
    if key is None:
        return
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        raise Unauthorized()


def guard(request: Request, settings: Settings) -> None:
    """Health, readiness, metrics and metadata need the key only with ``auth_all``."""
    if settings.auth_all:
        authorize(dict(request.scope["headers"]), settings)


# -- cold routes: responses and their documentation -------------------------------------------------------------


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


ERROR_TEXTS: dict[int, str] = {
    400: "invalid JSON",
    401: "missing or wrong API key",
    403: "the admin API is disabled (no key configured)",
    404: "unknown model or version",
    409: "a load, unload or reload is in progress",
    413: "too many inputs or too large a body",
    415: "not JSON",
    422: "invalid fields or a text too long with truncate=false",
    429: "queue full (see Retry-After)",
    503: "loading or draining",
    504: "deadline passed",
}


def error_docs(*codes: int, schema: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these statuses, with the native error body or another protocol's ``schema``."""
    body = schema or {"$ref": "#/components/schemas/ErrorResponse"}
    return {
        code: {"description": ERROR_TEXTS[code], "content": {"application/json": {"schema": body}}} for code in codes
    }


class ErrorResponse(msgspec.Struct):
    """The native error body (every bertserve route but the TEI and vLLM dialects')."""

    error: str  # what was wrong, in words
    type: str  # machine-readable error kind (service/errors.py)
    request_id: str  # the request's id (also the x-request-id header), for the logs


@dataclass(frozen=True)
class Routes:
    """What a protocol module contributes: hot routes, FastAPI routes, and the body schemas they document."""

    hot: list[HotRoute] = field(default_factory=list)
    router: APIRouter | None = None
    schemas: tuple[type[msgspec.Struct], ...] = ()


def operation(
    summary: str,
    tag: str,
    body: type[msgspec.Struct] | None,
    ok: dict[str, Any],
    errors: dict[int | str, dict[str, Any]],
    path_params: tuple[str, ...] = (),
) -> dict[str, Any]:
    """An OpenAPI operation object for a hot route (FastAPI documents the cold ones itself)."""
    doc: dict[str, Any] = {
        "summary": summary,
        "tags": [tag],
        "responses": {"200": {"description": "OK", **ok}, **{str(k): v for k, v in errors.items()}},
    }
    if body is not None:
        doc["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema(body)}}}
    if path_params:
        doc["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in path_params
        ]
    return doc
