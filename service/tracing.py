"""OpenTelemetry traces: off by default, configured by the standard OTEL_* environment variables.

On when OTEL_TRACES_EXPORTER names an exporter other than "none", or when OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set; never when OTEL_SDK_DISABLED=true. Exporters: "otlp" (OTLP over
HTTP/protobuf; the endpoint, headers, timeout and compression come from the exporter's own OTEL_EXPORTER_OTLP_*
variables) and "console". The SDK reads the rest itself: OTEL_SERVICE_NAME (default here "bertserve"),
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_* (batch processor).

The shape follows the service's process layout: API processes own request spans (one per request, with "tokenize"
and "queue" children timed by the request's own timing record), the engine process owns batch spans. A batch
serves requests of many traces, so it cannot be their child: it is a root span *linked* to each request span,
which crosses the process boundary as two integers (`RequestSpan.link_context`).

Off costs nothing measurable: `Tracing.request_span` returns None and `batch_span` returns at once, so the request
path holds `span = tracing.request_span(...)` and `if span is not None: ...`. The provider is this object's, not
the global one: setting the global provider is once-per-process and would leak between tests and reloads.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

__all__ = ["RequestSpan", "Tracing", "epoch_ns", "setup_tracing", "tracing_enabled"]

DEFAULT_SERVICE_NAME = "bertserve"
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = (b"traceparent", b"tracestate")

Headers = Mapping[str, str] | Sequence[tuple[bytes, bytes]]

# perf_counter_ns -> epoch ns. The request path times its stages with perf_counter (monotonic, cheap); spans
# want wall-clock epoch nanoseconds. On Linux perf_counter is CLOCK_MONOTONIC, the same clock in every process.
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def epoch_ns(perf_ns: int) -> int:
    """A `time.perf_counter_ns()` reading as epoch nanoseconds, what `stage` and `batch_span` take."""
    return perf_ns + _EPOCH_OFFSET_NS


def _env_true(name: str, environ: Mapping[str, str]) -> bool:
    return environ.get(name, "").strip().lower() == "true"


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return [name.strip() for name in raw.split(",") if name.strip()]


def tracing_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* variables ask for traces (see the module docstring for the rule)."""
    env = os.environ if environ is None else environ
    if _env_true("OTEL_SDK_DISABLED", env):
        return False
    names = _exporter_names(env)
    if names:
        return any(name != "none" for name in names)
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _resource(environ: Mapping[str, str]) -> Resource:
    """The SDK's resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES), with "bertserve" if neither names one."""
    named = bool(environ.get("OTEL_SERVICE_NAME")) or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    return Resource.create({} if named else {"service.name": DEFAULT_SERVICE_NAME})


def _processors(environ: Mapping[str, str]) -> list[SpanProcessor]:
    names = _exporter_names(environ) or ["otlp"]
    processors: list[SpanProcessor] = []
    for name in names:
        if name == "none":
            continue
        if name == "otlp":
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol and protocol != "http/protobuf":
                log.warning("OTLP protocol %r is not installed; exporting traces over http/protobuf", protocol)
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            processors.append(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER %r ignored (supported: otlp, console, none)", name)
    return processors


class RequestSpan:
    """The span of one request (SERVER kind), and what the request path records on it."""

    __slots__ = ("_tracer", "span")

    def __init__(self, tracer: trace.Tracer, span: Span) -> None:
        self._tracer = tracer
        self.span = span

    def stage(self, name: str, start_ns: int, end_ns: int) -> None:
        """A child span with explicit epoch-ns times ("tokenize", "queue"), recorded after the fact."""
        context = trace.set_span_in_context(self.span)
        self._tracer.start_span(name, context=context, start_time=start_ns).end(end_time=end_ns)

    def set_attribute(self, key: str, value: str | int | float | bool) -> None:
        self.span.set_attribute(key, value)

    def end(self, status_code: int | None = None, error: str | None = None, end_ns: int | None = None) -> None:
        """Close the span: the HTTP status as an attribute; ERROR status for 5xx or an error message (4xx are
        the client's doing and stay unset, as the HTTP semantic conventions say for server spans)."""
        if status_code is not None:
            self.span.set_attribute("http.response.status_code", status_code)
        if error is not None or (status_code is not None and status_code >= 500):
            self.span.set_status(Status(StatusCode.ERROR, error))
            if error is not None:
                self.span.set_attribute("error.type", error)
        self.span.end(end_time=end_ns)

    def link_context(self) -> tuple[int, int] | None:
        """(trace_id, span_id) for the batch span in another process to link to; None if not sampled."""
        ctx = self.span.get_span_context()
        if not ctx.is_valid or not ctx.trace_flags.sampled:
            return None
        return ctx.trace_id, ctx.span_id


class Tracing:
    """The process's tracer, or nothing when tracing is off (every method then returns at once)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._provider = provider
        self.enabled: bool = provider is not None
        self._tracer = provider.get_tracer("bertserve") if provider is not None else None

    def request_span(self, name: str, headers: Headers, attributes: dict[str, Any]) -> RequestSpan | None:
        """Start a request's span; W3C `traceparent`/`tracestate` in `headers` (a mapping, or ASGI's list of
        byte pairs) make it a child of the caller's span. Returns None when tracing is off."""
        tracer = self._tracer
        if tracer is None:
            return None
        carrier: dict[str, str] = {}
        if isinstance(headers, Mapping):
            for key in ("traceparent", "tracestate"):
                value = headers.get(key)
                if value is not None:
                    carrier[key] = value
        else:
            for key_bytes, value_bytes in headers:
                if key_bytes.lower() in _TRACE_HEADERS:
                    carrier[key_bytes.decode("latin-1").lower()] = value_bytes.decode("latin-1")
        context = _PROPAGATOR.extract(carrier) if carrier else Context()
        span = tracer.start_span(name, context=context, kind=SpanKind.SERVER, attributes=attributes)
        return RequestSpan(tracer, span)

    def batch_span(
        self, model: str, size: int, start_ns: int, end_ns: int, links: Sequence[tuple[int, int]] = ()
    ) -> None:
        """One inference batch (epoch-ns times), a root span linked to the request spans it served."""
        tracer = self._tracer
        if tracer is None:
            return
        span_links = [
            Link(SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
            for trace_id, span_id in links
        ]
        attributes: dict[str, str | int] = {"bertserve.model": model, "bertserve.batch.size": size}
        span = tracer.start_span(
            "batch",
            context=Context(),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            links=span_links,
            start_time=start_ns,
        )
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        """Flush and stop the exporters (at process exit, after the drain)."""
        if self._provider is not None:
            self._provider.shutdown()

    def force_flush(self, timeout_ms: int = 30_000) -> bool:
        return self._provider.force_flush(timeout_ms) if self._provider is not None else True


def setup_tracing(exporter: SpanExporter | None = None) -> Tracing:
    """The process's Tracing from the OTEL_* environment; an explicit `exporter` (tests) turns tracing on with a
    SimpleSpanProcessor, so that each span is exported the moment it ends."""
    environ = os.environ
    if exporter is not None:
        provider = TracerProvider(resource=_resource(environ))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return Tracing(provider)
    if not tracing_enabled(environ):
        return Tracing(None)
    processors = _processors(environ)
    if not processors:
        return Tracing(None)
    provider = TracerProvider(resource=_resource(environ))
    for processor in processors:
        provider.add_span_processor(processor)
    log.info("tracing on: exporters %s", ",".join(_exporter_names(environ) or ["otlp"]))
    return Tracing(provider)
