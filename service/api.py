"""FastAPI app factory and the native routes; the Open Inference Protocol routes live in service/v2.py.

The HTTP layer is thin: parse and validate, call ``Engine.infer``, shape the response. Every failure is a
typed exception mapped to a status code in one table (ERRORS), so each error looks the same on every route.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batching import DeadlineExceeded, Draining, InferenceFailed, QueueFull
from service.bundle import BundleError
from service.config import Settings
from service.engine import Engine
from service.metrics import Metrics
from service.runtime import Output, ProviderError, TextTooLong
from service.schemas import ErrorResponse, PredictRequest, PredictResponse, ReloadRequest

log = logging.getLogger("bertserve.api")


# -- errors ------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error with its own status; ``reason`` (when set) is counted in bertserve_rejected_total."""

    status = 400
    type = "bad_request"
    reason: str | None = "invalid"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class BadRequest(ApiError):
    status, type = 400, "bad_request"


class Unprocessable(ApiError):
    status, type = 422, "validation_error"


class Unauthorized(ApiError):
    status, type, reason = 401, "unauthorized", "unauthorized"


class Forbidden(ApiError):
    status, type, reason = 403, "forbidden", "unauthorized"


class NotFound(ApiError):
    status, type, reason = 404, "not_found", None


class Conflict(ApiError):
    status, type, reason = 409, "conflict", None


class PayloadTooLarge(ApiError):
    status, type, reason = 413, "payload_too_large", "too_large"


class UnsupportedMediaType(ApiError):
    status, type = 415, "unsupported_media_type"


class NotReady(ApiError):
    status, type, reason = 503, "not_ready", "not_ready"


# exception class -> (status, type, rejection reason or None); the one place statuses are decided
ERRORS: dict[type[Exception], tuple[int, str, str | None]] = {
    TextTooLong: (422, "text_too_long", "invalid"),
    QueueFull: (429, "queue_full", "queue_full"),
    Draining: (503, "draining", "not_ready"),
    DeadlineExceeded: (504, "deadline_exceeded", None),  # counted where the deadline is detected
    InferenceFailed: (500, "inference_failed", None),
}


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": message, "type": kind})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def json_response(payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
        media_type="application/json",
        headers=headers,
    )


# -- state -------------------------------------------------------------------------------------------------
@dataclass
class AppState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None
    ready: bool = False
    draining: bool = False
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    on_fatal: Callable[[], None] | None = None
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def current(self) -> Engine:
        """The engine to serve a request with, or NotReady."""
        if self.engine is None or not self.ready:
            raise NotReady("model is loading or warming up")
        return self.engine

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


# -- request helpers ---------------------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> Any:
    """Body as JSON; 413 before reading when Content-Length is too large, or as soon as the stream is."""
    content_type = request.headers.get("content-type", "application/json")
    if content_type.split(";")[0].strip().lower() not in ("application/json", ""):
        raise UnsupportedMediaType(f"content type must be application/json, not {content_type!r}")
    body = await read_body(request, limit)
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def validate(model: type[BaseModel], payload: Any) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise Unprocessable(describe_validation(exc.errors())) from None


def describe_validation(errors: Any) -> str:
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)


def check_texts(texts: list[str], max_client_batch: int) -> None:
    if not texts:
        raise Unprocessable("inputs is empty; send at least one text")
    if len(texts) > max_client_batch:
        raise PayloadTooLarge(f"{len(texts)} inputs exceed the limit of {max_client_batch} per request")
    for i, text in enumerate(texts):
        if not text.strip():
            raise Unprocessable(f"input {i} is empty or only whitespace")
        if "\x00" in text:
            raise Unprocessable(f"input {i} contains a NUL character")


def deadline_for(settings: Settings, timeout_s: float | None) -> float:
    timeout = settings.request_timeout_s if timeout_s is None else min(timeout_s, settings.max_request_timeout_s)
    return time.monotonic() + timeout


async def infer_or_disconnect(request: Request, engine: Engine, texts: list[str], truncate: bool,
                              deadline: float, metrics: Metrics) -> list[Output] | None:  # fmt: skip
    """Run inference in this task; if the client disconnects first, cancel it so its queued work is dropped.

    The body has been read, so the next ASGI message can only be the disconnect.
    """
    me = asyncio.current_task()
    assert me is not None
    gone = False
    waiting = True  # both flags are only touched on the event loop, so there is no race with the callback

    def on_message(watch: asyncio.Future[Any]) -> None:
        nonlocal gone
        ok = not watch.cancelled() and watch.exception() is None
        if waiting and ok and watch.result()["type"] == "http.disconnect":
            gone = True
            me.cancel()

    watch = asyncio.ensure_future(request.receive())
    watch.add_done_callback(on_message)
    try:
        return await engine.infer(texts, truncate, deadline)
    except asyncio.CancelledError:
        if not gone:
            raise
        me.uncancel()
        metrics.rejected.labels("disconnected").inc()
        return None
    finally:
        waiting = False
        watch.cancel()


async def infer_current(request: Request, state: AppState, engine: Engine, texts: list[str], truncate: bool,
                        deadline: float) -> tuple[Engine, list[Output] | None]:  # fmt: skip
    """Infer on ``engine``; when a hot reload swapped it out after it was chosen (its batcher stopped accepting),
    move to the engine now current instead of failing the request. Returns the engine that answered."""
    while True:
        try:
            return engine, await infer_or_disconnect(request, engine, texts, truncate, deadline, state.metrics)
        except Draining:
            if state.draining or state.engine is engine or state.engine is None:
                raise
            engine = state.engine


def authorize(request: Request, settings: Settings) -> None:
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    expected = settings.api_key.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise Unauthorized("missing or invalid API key; send `Authorization: Bearer <key>`",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def predictions(outputs: list[Output], labels: list[str], top_k: int | None) -> list[list[dict[str, Any]]]:
    k = len(labels) if top_k is None else min(top_k, len(labels))
    result = []
    for out in outputs:
        order = out.probs.argsort()[::-1][:k]
        result.append([{"label": labels[i], "score": float(out.probs[i])} for i in order])
    return result


# -- middleware --------------------------------------------------------------------------------------------
class MetricsMiddleware:
    """Pure ASGI (no per-request task or body copy): times every HTTP request by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m = self.metrics
        m.inflight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            m.inflight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            m.request_duration.labels(endpoint, str(status)).observe(time.perf_counter() - started)
            m.requests.labels(endpoint, str(status)).inc()


# -- lifecycle ---------------------------------------------------------------------------------------------
async def warm_and_serve(state: AppState, engine: Engine) -> None:
    try:
        seconds = await asyncio.to_thread(engine.warmup, state.settings.warmup_runs)
    except Exception:
        log.exception("warm-up failed; stopping")
        if state.on_fatal:
            state.on_fatal()
        return
    if state.engine is not None or state.draining:  # a reload won the race, or shutdown began
        await engine.close()
        return
    engine.start()
    state.engine, state.ready = engine, True
    r = engine.runtime
    log.info("ready: %s:%s variant=%s providers=%s (warm-up %.2f s)", r.name, r.version, r.variant,
             r.providers, seconds)  # fmt: skip


async def reload_engine(state: AppState, model_dir: Path | None, variant: str | None) -> Engine:
    """Load and warm a new engine beside the old, swap atomically, then drain and release the old one."""
    if state.reload_lock.locked():
        raise Conflict("a reload is already in progress")
    async with state.reload_lock:
        settings = state.settings
        try:
            engine = await asyncio.to_thread(Engine.load, settings, state.metrics, model_dir, variant)
            await asyncio.to_thread(engine.warmup, settings.warmup_runs)
        except Exception as exc:  # whatever stops the new bundle loading or warming, the old one serves on
            log.warning("reload refused: %s", exc)
            raise Unprocessable(f"reload refused, still serving the old model: {exc}") from None
        if state.draining or not state.ready:  # shutdown began, or the first model is not up yet
            await engine.close()
            raise NotReady("server is starting or draining; reload not applied")
        engine.start()
        old, state.engine = state.engine, engine
        log.info("reloaded: now serving %s:%s", engine.runtime.name, engine.runtime.version)
        if old is not None:
            state.spawn(old.close())
        return engine


def create_app(settings: Settings, engine: Engine | None = None, metrics: Metrics | None = None) -> FastAPI:
    """The app; ``engine`` (loaded with ``metrics``) is created at start-up when not given."""
    state = AppState(settings=settings, metrics=metrics or Metrics())
    # One source of truth across reloads: the queue of whichever engine is current.
    state.metrics.queue_depth.set_function(lambda: state.engine.batcher.depth if state.engine else 0)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal engine
        loaded, engine = engine, None  # keep no reference to the first engine: a reload must be able to free it
        if loaded is None:  # verify the bundle and create the session before listening
            try:
                loaded = await asyncio.to_thread(Engine.load, settings, state.metrics)
            except (BundleError, ProviderError) as exc:
                log.error("cannot start: %s", exc)
                raise SystemExit(2) from None
        state.spawn(warm_and_serve(state, loaded))
        del loaded
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: state.spawn(reload_quietly(state)))
        yield
        state.ready = False
        state.draining = True
        if state.engine is not None:
            await state.engine.close()

    app = FastAPI(
        title="bertserve",
        version="0.1.0",
        summary="BERT text classification with dynamic batching (native API and Open Inference Protocol v2)",
        lifespan=lifespan,
    )
    app.state.bertserve = state
    register_errors(app, state)
    add_native_routes(app, state)
    from service.v2 import add_v2_routes

    add_v2_routes(app, state)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app


async def reload_quietly(state: AppState) -> None:
    try:
        await reload_engine(state, None, None)
    except Exception:
        log.exception("SIGHUP reload failed; still serving the old model")


def register_errors(app: FastAPI, state: AppState) -> None:
    rejected = state.metrics.rejected

    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        if exc.reason:
            rejected.labels(exc.reason).inc()
        return error_response(exc.status, exc.type, str(exc), exc.headers)

    async def mapped(_: Request, exc: Exception) -> Response:
        status, kind, reason = ERRORS[type(exc)]
        if reason:
            rejected.labels(reason).inc()
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFull) else None
        return error_response(status, kind, str(exc), headers)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, "http_error", str(exc.detail), exc.headers)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        rejected.labels("invalid").inc()
        return error_response(422, "validation_error", describe_validation(exc.errors()))

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")

    app.add_exception_handler(ApiError, api_error)
    for exc_type in ERRORS:
        app.add_exception_handler(exc_type, mapped)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


ERROR_DOCS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "invalid JSON", 401: "missing or wrong API key", 413: "too many inputs or too large a body",
        415: "not JSON", 422: "invalid fields or a text too long with truncate=false",
        429: "queue full (see Retry-After)", 503: "loading or draining", 504: "deadline passed",
    }.items()
}  # fmt: skip


def add_native_routes(app: FastAPI, state: AppState) -> None:
    settings = state.settings
    open_probe = {"responses": {401: ERROR_DOCS[401]}} if settings.auth_all else {}

    def guard_probe(request: Request) -> None:
        if settings.auth_all:
            authorize(request, settings)

    @app.get("/healthz", tags=["health"], **open_probe)
    async def healthz(request: Request) -> dict[str, str]:
        """Liveness: 200 while the process can answer."""
        guard_probe(request)
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"], responses={503: ERROR_DOCS[503]})
    async def readyz(request: Request) -> Response:
        """Readiness: 200 once the model is loaded and warm; 503 while loading or draining."""
        guard_probe(request)
        if state.draining:
            return error_response(503, "draining", "server is draining")
        if not state.ready:
            return error_response(503, "not_ready", "model is loading or warming up")
        return json_response({"status": "ready"})

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus exposition of every bertserve_* series."""
        guard_probe(request)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/predict",
        tags=["inference"],
        response_model=PredictResponse,
        responses={k: v for k, v in ERROR_DOCS.items() if k != 401 or settings.api_key},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
    )
    async def predict(request: Request) -> Response:
        """Classify one text or a list of texts; scores are softmax probabilities."""
        authorize(request, settings)
        engine = state.current()
        body = validate(PredictRequest, await read_json(request, settings.max_body_bytes))
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        check_texts(texts, settings.max_client_batch)
        engine, outputs = await infer_current(
            request, state, engine, texts, body.truncate, deadline_for(settings, body.timeout_s)
        )
        if outputs is None:
            return error_response(499, "client_closed_request", "client disconnected")
        r = engine.runtime
        return json_response(
            {"model": r.name, "version": r.version, "predictions": predictions(outputs, r.labels, body.top_k)}
        )

    @app.get("/v1/models", tags=["models"], responses={503: ERROR_DOCS[503]})
    async def models() -> Response:
        """What is being served: labels, limits, the providers really in use, batching settings, metrics."""
        engine = state.current()
        r = engine.runtime
        m = r.bundle.manifest
        p = engine.policy
        return json_response({
            "name": r.name,
            "version": r.version,
            "task": m.task,
            "labels": r.labels,
            "max_length": r.max_length,
            "variant": r.variant,
            "variants": sorted(m.variants),
            "providers": r.providers,
            "base_model": m.base_model,
            "created": m.created,
            "dataset": m.dataset,
            "metrics": {name: v.metrics for name, v in m.variants.items()},
            "parity": {name: v.parity.model_dump() if v.parity else None for name, v in m.variants.items()},
            "batching": {
                "max_batch_size": p.max_batch_size,
                "max_batch_tokens": p.max_batch_tokens,
                "max_padding_ratio": p.max_padding_ratio,
                "max_wait_ms": p.max_wait_s * 1000.0,
                "lookahead": p.lookahead,
                "max_queue": p.max_queue,
                "max_client_batch": settings.max_client_batch,
                "workers": p.workers,
                "intra_op_threads": r.threads,
                "solo_threads": r.solo_threads,
                "queue_depth": engine.batcher.depth,
            },
        })  # fmt: skip

    @app.post(
        "/v1/admin/reload",
        tags=["admin"],
        responses={k: ERROR_DOCS[k] for k in (400, 401, 413, 422, 503)}
        | {403: {"model": ErrorResponse, "description": "no API key configured"},
           409: {"model": ErrorResponse, "description": "a reload is in progress"}},
        openapi_extra={
            "requestBody": {"content": {"application/json": {"schema": ReloadRequest.model_json_schema()}}}
        },
    )
    async def admin_reload(request: Request) -> Response:
        """Load a bundle (default: the configured directory), warm it, swap it in; protected by the API key."""
        if settings.api_key is None:
            raise Forbidden("the admin API is disabled; set BERTSERVE_API_KEY to enable it")
        authorize(request, settings)
        raw = await read_body(request, settings.max_body_bytes)
        payload: Any = {}
        if raw.strip():
            try:
                payload = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"request body is not valid JSON: {exc}") from None
        body = validate(ReloadRequest, payload)
        if state.draining:
            raise NotReady("server is draining")
        engine = await reload_engine(state, Path(body.model_dir) if body.model_dir else None, body.variant)
        r = engine.runtime
        return json_response({"name": r.name, "version": r.version, "variant": r.variant,
                              "providers": r.providers})  # fmt: skip
