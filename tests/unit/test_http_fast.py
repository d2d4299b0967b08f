"""The HTTP API in process: the real app, a real engine on the tiny bundle, httpx's ASGI transport; no sockets.

Every status of the error table, both protocols, auth, top_k, request ids and the timing headers, in
milliseconds per request. Process-level behaviour (signals, drain, start-up failures, several processes) is in
tests/integration/.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import Settings
from service.core import DataPlane
from service.engine import Engine
from service.errors import TABLE
from service.frontend.app import create_app
from service.frontend.lifecycle import Lifecycle
from service.metrics import Metrics
from service.tracing import Tracing

KEY = "fast-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@asynccontextmanager
async def client_for(bundle: Path, tracing: Tracing | None = None, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client over the app; the engine is started (loaded, warmed) before the first request."""
    config = Settings(model_dir=bundle, grpc_port=0, warmup_runs=0, **settings)
    metrics = Metrics()
    engine = Engine(config, metrics, tracing=tracing)
    await engine.start()
    plane = DataPlane(config, engine, metrics)
    app = create_app(config, plane, metrics, Lifecycle(plane), tracing)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://fast") as client:
            yield client
    finally:
        await engine.close()


def run(bundle: Path, body: Callable[[httpx.AsyncClient], Awaitable[None]], **settings: Any) -> None:
    async def main() -> None:
        async with client_for(bundle, **settings) as client:
            await body(client)

    asyncio.run(main())


def test_predict_answers_with_labels_scores_request_id_and_timings(tiny_bundle: Path) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        r = await client.post(
            "/v1/predict", json={"inputs": ["a great film", "terrible, awful"]}, headers={"x-request-id": "abc-123"}
        )
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["model"] == "tiny" and doc["version"] == "1"
        assert [row[0]["label"] for row in doc["predictions"]] == ["positive", "negative"]
        assert doc["labels"] == [["positive"], ["negative"]]
        for row in doc["predictions"]:
            scores = [p["score"] for p in row]
            assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
        assert r.headers["x-request-id"] == "abc-123"
        timings = {
            h: float(r.headers[h]) for h in ("x-total-time", "x-tokenize-time", "x-queue-time", "x-inference-time")
        }
        assert all(v >= 0 for v in timings.values())
        assert timings["x-total-time"] >= timings["x-inference-time"] + timings["x-tokenize-time"]
        top1 = (await client.post("/v1/predict", json={"inputs": "great", "top_k": 1})).json()
        assert len(top1["predictions"][0]) == 1
        raw = (await client.post("/v1/predict", json={"inputs": "great", "raw_scores": True})).json()
        assert abs(sum(p["score"] for p in raw["predictions"][0]) - 1) > 1e-3  # logits, not probabilities
        bad_id = await client.post("/v1/predict", json={"inputs": "x"}, headers={"x-request-id": "bad id!"})
        assert bad_id.headers["x-request-id"] != "bad id!" and len(bad_id.headers["x-request-id"]) >= 8

    run(tiny_bundle, body)


def test_v2_infer_json_and_binary_with_timings(tiny_bundle: Path) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        req = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["great", "awful"]}]}
        r = await client.post("/v2/models/tiny/infer", json=req)
        assert r.status_code == 200, r.text
        outputs = {o["name"]: o for o in r.json()["outputs"]}
        assert outputs["labels"]["data"] == ["positive", "negative"] and outputs["logits"]["shape"] == [2, 3]
        assert "x-inference-time" in r.headers
        item = b"great"
        header = {
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4 + len(item)}}
            ],
            "outputs": [{"name": "labels", "parameters": {"binary_data": True}}],
        }
        head = httpx.Request("POST", "/", json=header).content
        r = await client.post(
            "/v2/models/tiny/versions/1/infer",
            content=head + struct.pack("<I", len(item)) + item,
            headers={"inference-header-content-length": str(len(head))},
        )
        assert r.status_code == 200, r.text
        cut = int(r.headers["inference-header-content-length"])
        assert r.content[cut + 4 :] == b"positive"

    run(tiny_bundle, body)


# (request kwargs, expected status, expected type): one case per row of the error table that a request can reach
ERROR_CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("bad JSON", {"content": b"{", "headers": {"content-type": "application/json"}}, 400, "bad_request"),
    ("no key", {"json": {"inputs": "a"}, "headers": {}}, 401, "unauthorized"),
    ("unknown model", {"json": {"inputs": "a", "model": "nope"}}, 404, "not_found"),
    ("too many inputs", {"json": {"inputs": ["a"] * 5}}, 413, "payload_too_large"),
    ("not JSON", {"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ("wrong field", {"json": {"inputs": "a", "top_k": 0}}, 422, "validation_error"),
    ("too long", {"json": {"inputs": "word " * 300, "truncate": False}}, 422, "text_too_long"),
    ("pair to a single-text model", {"json": {"inputs": [["a", "b"]]}}, 422, "validation_error"),
    ("queue full", {"json": {"inputs": ["a", "b", "c"]}}, 429, "queue_full"),
    ("deadline", {"json": {"inputs": "a", "timeout_s": 1e-9}}, 504, "deadline_exceeded"),
]


@pytest.mark.parametrize(("what", "kwargs", "status", "kind"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_table_statuses_and_shape(
    tiny_bundle: Path, what: str, kwargs: dict[str, Any], status: int, kind: str
) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        extra = kwargs.pop("headers", {})
        headers = {} if what == "no key" else {**AUTH, **extra}
        r = await client.post("/v1/predict", headers=headers, **kwargs)
        assert r.status_code == status, r.text
        doc = r.json()
        assert set(doc) == {"error", "type", "request_id"} and doc["type"] == kind and doc["error"]
        assert doc["request_id"] == r.headers["x-request-id"]
        if status == 429:
            assert int(r.headers["retry-after"]) >= 1
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"

    run(tiny_bundle, body, api_key=KEY, max_client_batch=4, max_queue=2)


def test_every_status_in_the_error_table_is_reachable_or_documented() -> None:
    """The table the README shows is the one the code uses: distinct (status, type) pairs, gRPC codes named."""
    import grpc

    pairs = [(cls.status, cls.type) for cls in TABLE]
    assert len(pairs) == len(set(pairs))
    for cls in TABLE:
        assert hasattr(grpc.StatusCode, cls.grpc), cls
    reached = {(s, k) for _, _, s, k in ERROR_CASES}
    assert {(422, "text_too_long"), (429, "queue_full"), (504, "deadline_exceeded")} <= reached


def test_not_ready_until_started_and_readiness_probes(tiny_bundle: Path) -> None:
    async def main() -> None:
        config = Settings(model_dir=tiny_bundle, grpc_port=0, warmup_runs=0)
        metrics = Metrics()
        engine = Engine(config, metrics)
        plane = DataPlane(config, engine, metrics)
        app = create_app(config, plane, metrics, Lifecycle(plane))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fast") as client:
            assert (await client.get("/readyz")).status_code == 503
            r = await client.post("/v1/predict", json={"inputs": "a"})
            assert r.status_code == 503 and r.json()["type"] == "not_ready"
            await engine.start()
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.get("/v2/health/ready")).status_code == 200
            plane.draining = True
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.post("/v1/predict", json={"inputs": "a"})).status_code == 200  # still served
        await engine.close()

    asyncio.run(main())


def test_tracing_spans_for_a_request_and_its_batch(tiny_bundle: Path) -> None:
    """A request span (child of the caller's traceparent) with tokenize and queue children, and a batch span
    linked to it, through the real app and engine (the SDK's in-memory exporter)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service.tracing import setup_tracing

    exporter = InMemorySpanExporter()
    tracing = setup_tracing(exporter)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def main() -> None:
        async with client_for(tiny_bundle, tracing=tracing) as client:
            r = await client.post("/v1/predict", json={"inputs": "great"}, headers={"traceparent": parent})
            assert r.status_code == 200

    asyncio.run(main())
    tracing.force_flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request = spans["POST /v1/predict"]
    assert f"{request.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert spans["tokenize"].parent.span_id == request.context.span_id
    assert spans["queue"].parent.span_id == request.context.span_id
    batch = spans["batch"]
    assert [link.context.span_id for link in batch.links] == [request.context.span_id]
    tracing.shutdown()


def test_openapi_and_offline_docs(tiny_bundle: Path) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        doc = (await client.get("/openapi.json")).json()
        assert {"/v1/predict", "/v2/models/{name}/infer", "/v1/models"} <= set(doc["paths"])
        page = await client.get("/docs")
        assert page.status_code == 200 and "cdn" not in page.text.lower()

    run(tiny_bundle, body)


def test_metadata_exposes_no_absolute_path(tiny_bundle: Path) -> None:
    """/v1/models, v2 metadata and config show no path of the machine that trained or serves the bundle."""

    def strings(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [s for k, v in node.items() for s in [k, *strings(v)]]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    async def body(client: httpx.AsyncClient) -> None:
        for path in ("/v1/models", "/v2/models/tiny", "/v2/models/tiny/config"):
            doc = (await client.get(path)).json()
            leaked = [s for s in strings(doc) if s.startswith("/") or str(tiny_bundle) in s or "/tmp/" in s]
            assert not leaked, f"{path}: {leaked}"

    run(tiny_bundle, body)
