"""service.tracing: the OTEL_* switch, request spans with tokenize/queue children under a caller's traceparent,
batch spans linked to the requests they served (SDK in-memory exporter), and a real OTLP/HTTP export received by a
local HTTP server."""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.tracing import Tracing, epoch_ns, setup_tracing, tracing_enabled

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def memory() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracing = setup_tracing(exporter)
    yield tracing, exporter
    tracing.shutdown()


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none,console"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_the_otel_variables_switch_tracing(env: dict[str, str], on: bool) -> None:
    assert tracing_enabled(env) is on


def test_off_by_default_and_then_every_call_is_a_no_op() -> None:
    tracing = setup_tracing()
    assert not tracing.enabled
    assert tracing.request_span("POST /v1/predict", {"traceparent": TRACEPARENT}, {}) is None
    tracing.batch_span("m", 8, 1, 2, [(1, 2)])
    assert tracing.force_flush()
    tracing.shutdown()


def test_request_span_with_stages_under_the_callers_traceparent(memory: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = memory
    assert tracing.enabled
    t0 = time.time_ns()
    span = tracing.request_span(
        "POST /v1/predict", {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}, {"http.route": "/v1/predict"}
    )
    assert span is not None
    span.stage("tokenize", t0 + 1_000, t0 + 50_000)
    span.stage("queue", t0 + 50_000, t0 + 900_000)
    span.end(200, None)
    spans = by_name(exporter.get_finished_spans())
    request, tokenize, queue = spans["POST /v1/predict"], spans["tokenize"], spans["queue"]
    assert request.kind is SpanKind.SERVER
    assert request.context is not None and request.context.trace_id == TRACE_ID
    assert request.parent is not None and request.parent.span_id == PARENT_ID and request.parent.is_remote
    assert request.context.trace_state.get("vendor") == "1"
    assert request.attributes is not None and request.attributes["http.route"] == "/v1/predict"
    assert request.attributes["http.response.status_code"] == 200
    assert request.status.status_code is StatusCode.UNSET
    for child, (start, end) in ((tokenize, (1_000, 50_000)), (queue, (50_000, 900_000))):
        assert child.parent is not None and child.parent.span_id == request.context.span_id
        assert child.context is not None and child.context.trace_id == TRACE_ID
        assert (child.start_time, child.end_time) == (t0 + start, t0 + end)


def test_asgi_header_pairs_carry_the_traceparent_too(memory: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = memory
    headers = [(b"content-type", b"application/json"), (b"Traceparent", TRACEPARENT.encode())]
    span = tracing.request_span("POST /v2/models/{name}/infer", headers, {})
    assert span is not None
    span.end(503, "queue_full")
    (finished,) = exporter.get_finished_spans()
    assert finished.context is not None and finished.context.trace_id == TRACE_ID
    assert finished.status.status_code is StatusCode.ERROR and finished.status.description == "queue_full"


def test_no_traceparent_starts_a_new_trace_and_4xx_is_not_an_error(
    memory: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = memory
    span = tracing.request_span("POST /v1/predict", {}, {})
    assert span is not None
    span.end(422, None)
    (finished,) = exporter.get_finished_spans()
    assert finished.parent is None and finished.context is not None and finished.context.trace_id != TRACE_ID
    assert finished.status.status_code is StatusCode.UNSET


def test_batch_span_links_the_requests_it_served(memory: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = memory
    first = tracing.request_span("POST /v1/predict", {"traceparent": TRACEPARENT}, {})
    second = tracing.request_span("POST /v1/predict", {}, {})
    assert first is not None and second is not None
    links = [first.link_context(), second.link_context()]
    assert None not in links
    start = epoch_ns(time.perf_counter_ns())
    tracing.batch_span("bbc", 2, start, start + 5_000_000, [link for link in links if link is not None])
    first.end(200, None)
    second.end(200, None)
    batch = by_name(exporter.get_finished_spans())["batch"]
    assert batch.parent is None  # a root: it serves several traces
    assert batch.attributes == {"bertserve.model": "bbc", "bertserve.batch.size": 2}
    assert [(link.context.trace_id, link.context.span_id) for link in batch.links] == links
    assert (batch.start_time, batch.end_time) == (start, start + 5_000_000)
    assert abs(start - time.time_ns()) < 5_000_000_000  # epoch_ns maps perf_counter onto the wall clock


def test_an_unsampled_caller_gives_no_link(memory: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = memory
    span = tracing.request_span("POST /v1/predict", {"traceparent": TRACEPARENT[:-2] + "00"}, {})
    assert span is not None and span.link_context() is None  # parent-based sampling: the caller said no
    span.end(200, None)
    assert exporter.get_finished_spans() == ()


# ----------------------------------------------------------------------------------------------------------------
# OTLP over HTTP, to a real (local) receiver


class Receiver(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, self.headers.get("Content-Type", ""), body))
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)  # port 0: a free one
    Receiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", Receiver.received
    finally:
        server.shutdown()
        server.server_close()


def test_otlp_http_export_reaches_a_receiver(
    receiver: tuple[str, list[tuple[str, str, bytes]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, received = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)  # the SDK appends /v1/traces
    tracing = setup_tracing()
    assert tracing.enabled
    span = tracing.request_span("POST /v1/predict", {"traceparent": TRACEPARENT}, {"bertserve.inputs": 2})
    assert span is not None
    now = time.time_ns()
    span.stage("tokenize", now - 2_000_000, now - 1_000_000)
    span.stage("queue", now - 1_000_000, now)
    link = span.link_context()
    span.end(200, None)
    tracing.batch_span("bbc", 1, now - 900_000, now - 100_000, [link] if link else [])
    tracing.shutdown()  # flushes the batch processor
    assert received, "no export arrived"
    paths = {path for path, _, _ in received}
    assert paths == {"/v1/traces"}
    assert all(content_type == "application/x-protobuf" for _, content_type, _ in received)
    names, services = [], set()
    for _, _, body in received:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            services.add(attrs.get("service.name"))
            for scope_spans in resource_spans.scope_spans:
                for exported in scope_spans.spans:
                    names.append(exported.name)
                    if exported.name == "POST /v1/predict":
                        assert exported.trace_id == TRACE_ID.to_bytes(16, "big")
                        assert exported.parent_span_id == PARENT_ID.to_bytes(8, "big")
                    if exported.name == "batch":
                        assert [lk.trace_id for lk in exported.links] == [TRACE_ID.to_bytes(16, "big")]
    assert sorted(names) == ["POST /v1/predict", "batch", "queue", "tokenize"]
    assert services == {"bertserve"}


def test_otel_service_name_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "bertserve-canary")
    exporter = InMemorySpanExporter()
    tracing = setup_tracing(exporter)
    span = tracing.request_span("x", {}, {})
    assert span is not None
    span.end(200, None)
    (finished,) = exporter.get_finished_spans()
    assert finished.resource.attributes["service.name"] == "bertserve-canary"
    tracing.shutdown()
