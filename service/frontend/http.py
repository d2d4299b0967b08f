"""The shared HTTP kit: one request context, body reading with limits, auth, JSON and error replies, timing.

The hot routes (``POST /v1/predict``, ``POST /v2/models/{m}/infer`` and the dialects) are plain ASGI handlers
``async (Ctx) -> Reply`` run by :meth:`Kit.serve`, which owns everything they share: request id, auth errors,
the error table, per-request metrics (children bound once), the inflight gauge, the access log and the reply.
Profiling showed the framework (routing, middleware, dependency injection, pydantic request models) cost
several times the request's own work at thousands of requests/s, so these routes bypass it; FastAPI still
serves every other route and the OpenAPI document.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import SecretStr
from starlette.types import Message, Receive, Scope, Send

from service.config import Settings
from service.core import DataPlane, Timing
from service.errors import (
    BadRequest,
    Disconnected,
    PayloadTooLarge,
    ServeError,
    Unauthorized,
    UnsupportedMediaType,
)
from service.logs import log_access, new_request_id, request_id, valid_request_id
from service.metrics import Metrics
from service.tracing import RequestSpan, Tracing

log = logging.getLogger("bertserve.http")

JSON = b"application/json"


def probe(receive: Receive) -> Callable[[], bool] | None:
    """A cheap "has the client gone?" check: uvicorn's request cycle keeps a ``disconnected`` flag.

    Reading the flag costs nothing; waiting for an ``http.disconnect`` message would cost a task per request.
    Servers that keep no such flag get no probe (their requests are then dropped only by deadline).
    """
    cycle = getattr(receive, "__self__", None)
    if cycle is None or not hasattr(cycle, "disconnected"):
        return None
    return lambda: bool(cycle.disconnected)


@dataclass(slots=True)
class Ctx:
    """One HTTP request as a hot handler sees it."""

    scope: Scope
    receive: Receive
    headers: dict[bytes, bytes]
    request_id: str
    timing: Timing
    gone: Callable[[], bool] | None
    params: dict[str, str] = field(default_factory=dict)  # path parameters
    span: RequestSpan | None = None  # the request's trace span, when tracing is on


@dataclass(slots=True)
class Reply:
    body: bytes
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes = JSON
    timed: bool = False  # an inference reply: add the timing headers


Handler = Callable[[Ctx], Awaitable[Reply]]
ErrorShape = Callable[[ServeError, str], bytes]


def error_body(exc: ServeError, rid: str) -> bytes:
    """The native error shape: ``{"error", "type", "request_id"}``."""
    return orjson.dumps({"error": exc.message, "type": exc.type, "request_id": rid})


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


async def read_body(ctx: Ctx, limit: int) -> bytes:
    """The whole body; 413 before reading when Content-Length is too large, or as soon as the stream is."""
    declared = ctx.headers.get(b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    message = await ctx.receive()
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
        message = await ctx.receive()
        if message["type"] == "http.disconnect":
            raise Disconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_json_content_type(ctx: Ctx) -> None:
    content_type = ctx.headers.get(b"content-type", b"application/json").decode("latin-1")
    if content_type.split(";")[0].strip().lower() not in ("application/json", ""):
        raise UnsupportedMediaType(f"content type must be application/json, not {content_type!r}")


def loads(body: bytes, what: str = "request body") -> Any:
    if not body:
        raise BadRequest(f"{what} is not valid JSON: the body is empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None


class Kit:
    """Runs hot handlers: the one place a hot request is timed, counted, logged, answered or failed."""

    def __init__(self, settings: Settings, plane: DataPlane, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tracing = tracing if tracing is not None and tracing.enabled else None
        self.plane = plane
        self.metrics = metrics
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._rejected = {
            reason: metrics.rejected.labels(reason)
            for reason in ("invalid", "unauthorized", "too_large", "not_ready", "queue_full", "disconnected")
        }
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

    async def serve(
        self,
        endpoint: str,
        handler: Handler,
        scope: Scope,
        receive: Receive,
        send: Send,
        params: dict[str, str] | None = None,
        error_shape: ErrorShape = error_body,
    ) -> None:
        timing = Timing()
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id")
        rid = given.decode("latin-1") if given is not None and valid_request_id(given.decode("latin-1")) else ""
        rid = rid or new_request_id()
        token = request_id.set(rid)
        ctx = Ctx(scope, receive, headers, rid, timing, probe(receive), params or {})
        if self.tracing is not None:
            ctx.span = self.tracing.request_span(
                f"{scope.get('method', '')} {endpoint}",
                scope["headers"],
                {"http.route": endpoint, "bertserve.request_id": rid},
            )
        self._inflight.inc()
        try:
            try:
                reply = await handler(ctx)
            except ServeError as exc:
                if exc.reason is not None:
                    self._rejected[exc.reason].inc()
                extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
                reply = Reply(error_shape(exc, rid), exc.status, extra)
            except Disconnected:  # counted where it was found; nothing to answer
                self.observe(endpoint, 499, timing.total_s())
                if ctx.span is not None:
                    ctx.span.end(499, "client went away")
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
                out += timing.headers(rid)
            else:
                out.append((b"x-request-id", rid.encode()))
            await send({"type": "http.response.start", "status": reply.status, "headers": out})
            await send({"type": "http.response.body", "body": reply.body})
            seconds = timing.total_s()
            self.observe(endpoint, reply.status, seconds)
            if ctx.span is not None:
                ctx.span.end(reply.status, None if reply.status < 400 else str(reply.status))
            if ctx.gone is not None and reply.status < 300 and ctx.gone():
                self._rejected["disconnected"].inc()  # computed, but nobody was there to read it
            if self.access_log:
                log_access(scope.get("method", ""), endpoint, reply.status, seconds * 1000)
        finally:
            self._inflight.dec()
            request_id.reset(token)


async def call_captured(run: Callable[[Send], Awaitable[None]]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Run an ASGI-style call and capture its response (for the FastAPI routes that delegate to a hot handler)."""
    status, headers, body = 500, [], b""

    async def send(message: Message) -> None:
        nonlocal status, headers, body
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    await run(send)
    return status, headers, body
