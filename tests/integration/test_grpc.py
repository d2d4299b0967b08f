"""KServe v2 gRPC against a real server: tritonclient.grpc for every RPC, the raw stub for what tritonclient
does not send (``contents.bytes_contents``, malformed requests), the API key, deadlines, metrics, cancellation
and the drain on SIGTERM. Every bad input gets a gRPC status code, never a crash.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.integration.conftest import Server, free_port

MODEL = "tiny"
KEY = "grpc-test-key"
META = [("authorization", f"Bearer {KEY}")]
HEADERS = {"authorization": f"Bearer {KEY}"}
LONG_TEXT = "word " * 400


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("grpc") / "server.log"
    srv = with_grpc(lambda **kw: Server(tiny_bundle, log, **kw), api_key=KEY)
    yield srv
    srv.close()


GRPC_PORTS: dict[str, int] = {}  # server URL -> its gRPC port


def with_grpc(make: Any, **settings: Any) -> Server:
    port = free_port()
    srv: Server = make(grpc_port=port, **settings)
    GRPC_PORTS[srv.url] = port
    return srv


def target(server: Server) -> str:
    return f"127.0.0.1:{GRPC_PORTS[server.url]}"


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Any]:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(target(server))
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[Any]:
    channel = grpc.insecure_channel(target(server))
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def text_input(texts: list[str], name: str = "text") -> Any:
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput(name, [len(texts), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    return inp


def native(server: Server, texts: list[str]) -> np.ndarray:
    r = server.client.post("/v1/predict", json={"inputs": texts, "raw_scores": True}, headers=HEADERS)
    labels = ["negative", "neutral", "positive"]
    return np.array([[{p["label"]: p["score"] for p in row}[k] for k in labels] for row in r.json()["predictions"]])


# -- every RPC through tritonclient ------------------------------------------------------------------------
def test_health_and_metadata(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta.name == "bertserve" and "model_repository" in meta.extensions
    model = client.get_model_metadata(MODEL, as_json=True)
    assert model["platform"] == "onnxruntime_onnx" and model["inputs"][0]["name"] == "text"
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert config["name"] == MODEL and config["input"][0]["data_type"] == "TYPE_STRING"
    assert "dynamic_batching" in config


def test_infer_raw_matches_native_api(server: Server, client: Any) -> None:
    import tritonclient.grpc as grpcclient

    texts = ["a great film", "awful, boring", "fine"]
    outputs = [grpcclient.InferRequestedOutput("logits"), grpcclient.InferRequestedOutput("labels")]
    r = client.infer(MODEL, [text_input(texts)], outputs=outputs, headers=HEADERS)
    logits = r.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (3, 3)
    np.testing.assert_allclose(logits, native(server, texts), rtol=1e-5, atol=1e-5)
    labels = ["negative", "neutral", "positive"]
    assert [b.decode() for b in r.as_numpy("labels")] == [labels[i] for i in logits.argmax(1)]
    top = client.infer(
        MODEL, [text_input(texts)], outputs=[grpcclient.InferRequestedOutput("logits", class_count=2)], headers=HEADERS
    ).as_numpy("logits")
    assert top.shape == (3, 2) and top[0, 0].decode().count(":") == 2


def test_infer_with_contents_bytes(server: Server, stub: Any) -> None:
    request = pb.ModelInferRequest(model_name=MODEL, id="req-7")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"a great film", b"awful, boring"])
    response = stub.ModelInfer(request, metadata=META)
    assert response.id == "req-7" and [o.name for o in response.outputs] == ["logits", "labels"]
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 3)
    np.testing.assert_allclose(logits, native(server, ["a great film", "awful, boring"]), rtol=1e-5, atol=1e-5)


def test_statistics_and_repository(client: Any) -> None:
    client.infer(MODEL, [text_input(["ok"])], headers=HEADERS)
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 1 and int(stats["inference_stats"]["success"]["count"]) >= 1
    index = client.get_model_repository_index(headers=HEADERS, as_json=True)["models"]
    assert index == [{"name": MODEL, "version": "1", "state": "READY"}]


# -- auth, deadline, errors --------------------------------------------------------------------------------
def test_the_key_is_required_for_inference_and_the_repository(client: Any) -> None:
    from tritonclient.utils import InferenceServerException

    for call in (
        lambda h: client.infer(MODEL, [text_input(["a"])], headers=h),
        lambda h: client.get_model_repository_index(headers=h),
        lambda h: client.load_model(MODEL, headers=h),
        lambda h: client.unload_model(MODEL, headers=h),
    ):
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            with pytest.raises(InferenceServerException) as info:
                call(headers)
            assert info.value.status() == "StatusCode.UNAUTHENTICATED", info.value


def test_deadline_is_the_request_deadline(client: Any, stub: Any) -> None:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [text_input(["a"] * 64)], headers=HEADERS, client_timeout=0.0005)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"fine")
    assert stub.ModelInfer(request, metadata=META, timeout=10).outputs  # a generous deadline is met


def _request(
    *tensors: tuple[str, str, list[int], list[bytes]], raw: list[bytes] | None = None, model: str = MODEL, **params: Any
) -> Any:
    request = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape, items in tensors:
        t = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw is None:
            t.contents.bytes_contents.extend(items)
    if raw is not None:
        request.raw_input_contents.extend(raw)
    for key, value in params.items():
        param = request.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)
    return request


def _len_prefixed(*items: bytes) -> bytes:
    import struct

    return b"".join(struct.pack("<I", len(x)) + x for x in items)


OK = ("text", "BYTES", [1], [b"fine"])
BAD_GRPC: list[tuple[str, Any, str]] = [
    ("unknown-model", _request(OK, model="nope"), "NOT_FOUND"),
    ("unknown-version", pb.ModelInferRequest(model_name=MODEL, model_version="9"), "NOT_FOUND"),
    ("no-inputs", pb.ModelInferRequest(model_name=MODEL), "INVALID_ARGUMENT"),
    ("wrong-name", _request(("input_ids", "BYTES", [1], [b"a"])), "INVALID_ARGUMENT"),
    ("two-inputs", _request(OK, ("text", "BYTES", [1], [b"b"])), "INVALID_ARGUMENT"),
    ("fp32", _request(("text", "FP32", [1], [])), "INVALID_ARGUMENT"),
    ("shape-3d", _request(("text", "BYTES", [1, 1, 1], [b"a"])), "INVALID_ARGUMENT"),
    ("shape-scalar", _request(("text", "BYTES", [], [b"a"])), "INVALID_ARGUMENT"),
    ("count-mismatch", _request(("text", "BYTES", [3], [b"a"])), "INVALID_ARGUMENT"),
    ("no-data", _request(("text", "BYTES", [1], [])), "INVALID_ARGUMENT"),
    ("empty-string", _request(("text", "BYTES", [1], [b""])), "INVALID_ARGUMENT"),
    ("nul", _request(("text", "BYTES", [1], [b"a\x00b"])), "INVALID_ARGUMENT"),
    ("invalid-utf8", _request(("text", "BYTES", [1], [b"\xff\xfe"])), "INVALID_ARGUMENT"),
    (
        "too-long-no-truncate",
        _request(("text", "BYTES", [1], [LONG_TEXT.encode()]), truncate=False),
        "INVALID_ARGUMENT",
    ),
    ("truncate-not-bool", _request(OK, truncate="yes"), "INVALID_ARGUMENT"),
    ("timeout-negative", _request(OK, timeout_s=-1.0), "INVALID_ARGUMENT"),
    ("too-many", _request(("text", "BYTES", [65], [b"a"] * 65)), "RESOURCE_EXHAUSTED"),
    ("raw-count-mismatch", _request(OK, raw=[_len_prefixed(b"a"), b"x"]), "INVALID_ARGUMENT"),
    ("raw-truncated", _request(("text", "BYTES", [1], []), raw=[b"\x05\x00\x00"]), "INVALID_ARGUMENT"),
    ("raw-item-too-long", _request(("text", "BYTES", [1], []), raw=[b"\x64\x00\x00\x00short"]), "INVALID_ARGUMENT"),
    ("raw-shape-mismatch", _request(("text", "BYTES", [2], []), raw=[_len_prefixed(b"a")]), "INVALID_ARGUMENT"),
    ("raw-too-large", _request(("text", "BYTES", [1], []), raw=[b"a" * (2 << 20)]), "RESOURCE_EXHAUSTED"),
    (
        "unknown-output",
        pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"a"])
                )
            ],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probs")],
        ),
        "INVALID_ARGUMENT",
    ),
]


@pytest.mark.parametrize(("case", "request_", "code"), BAD_GRPC, ids=[c[0] for c in BAD_GRPC])
def test_bad_input_is_a_grpc_error(stub: Any, case: str, request_: Any, code: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_, metadata=META, timeout=10)
    assert info.value.code().name == code, (case, info.value.code(), info.value.details())
    assert info.value.details()


def test_bad_metadata_requests_and_survival(server: Server, stub: Any) -> None:
    for call, request, code in [
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="nope"), "NOT_FOUND"),
        (stub.ModelConfig, pb.ModelConfigRequest(name=MODEL, version="9"), "NOT_FOUND"),
        (stub.ModelStatistics, pb.ModelStatisticsRequest(name="nope"), "NOT_FOUND"),
        (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=MODEL), "INVALID_ARGUMENT"),
        (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=MODEL), "INVALID_ARGUMENT"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=META, timeout=10)
        assert info.value.code().name == code, (request, info.value.details())
    assert server.proc.poll() is None and stub.ServerLive(pb.ServerLiveRequest()).live
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_calls_are_counted_in_metrics(server: Server, client: Any) -> None:
    before = server.metric("bertserve_requests_total", {"endpoint": "grpc:ModelInfer", "status": "200"})
    client.infer(MODEL, [text_input(["a"])], headers=HEADERS)
    after = server.metric("bertserve_requests_total", {"endpoint": "grpc:ModelInfer", "status": "200"})
    assert after == before + 1
    assert server.metric("bertserve_request_duration_seconds_count", {"endpoint": "grpc:ModelInfer"}) >= 1


def test_a_cancelled_call_is_not_an_error(server: Server, stub: Any) -> None:
    request = _request(("text", "BYTES", [64], [b"word " * 60] * 64))
    futures = [stub.ModelInfer.future(request, metadata=META) for _ in range(8)]
    for f in futures:
        f.cancel()
    time.sleep(0.5)
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert " ERROR " not in server.log() and "Traceback" not in server.log(), server.log()[-3000:]


# -- drain -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_answers_calls_in_flight_and_through_the_drain_delay_then_exits_0(start_server: Any) -> None:
    """As over HTTP: SIGTERM turns readiness off at once, calls are still answered during drain_delay_s (so load
    balancers see the pod leave first), then the server stops (new calls: UNAVAILABLE) and exits 0."""
    srv = with_grpc(start_server, api_key=KEY, drain_delay_s=1.5)
    channel = grpc.insecure_channel(target(srv))
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = _request(("text", "BYTES", [32], [b"a fairly ordinary sentence about a film"] * 32))
    results: list[str] = []

    def call() -> None:
        try:
            stub.ModelInfer(request, metadata=META, timeout=30)
            results.append("OK")
        except grpc.RpcError as exc:
            results.append(exc.code().name)

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert results == ["OK"] * 16, results
    assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    assert stub.ModelInfer(request, metadata=META, timeout=10).outputs  # still answered within the delay
    assert srv.proc.wait(30) == 0
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, metadata=META, timeout=5)
    assert info.value.code().name == "UNAVAILABLE"
    channel.close()
    assert "Traceback" not in srv.log()
