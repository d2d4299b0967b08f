"""The serving core over real HTTP: correctness vs direct ONNX Runtime, batching, limits, deadlines, drain, v2."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

TEXTS = [
    "great",
    "the film was terrible.",
    "honestly, the hotel was okay and I would say so again",
    "after waiting for two hours in the rain with the kids, the concert was amazing, to be honest about it all",
    "I thought this laptop was awful, really awful.",
    "fine",
    "we went last week and the service turned out wonderful",
]


def reference_scores(bundle: Path, texts: list[str]) -> list[dict[str, float]]:
    """Each text alone (no padding) through a plain ONNX Runtime session: what the server must reproduce."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(manifest["max_length"])
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    out = []
    for text in texts:
        ids = np.array([tok.encode(text).ids], dtype=np.int64)
        logits = session.run(
            None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        )[0][0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        out.append(dict(zip(manifest["labels"], probs.tolist(), strict=True)))
    return out


def as_dict(prediction: list[dict]) -> dict[str, float]:
    return {p["label"]: p["score"] for p in prediction}


def test_scores_match_onnxruntime_alone_and_batched(shared_server, tiny_bundle: Path) -> None:
    expected = reference_scores(tiny_bundle, TEXTS)
    for text, want in zip(TEXTS, expected, strict=True):  # alone
        r = shared_server.client.post("/v1/predict", json={"inputs": text})
        assert r.status_code == 200, r.text
        got = as_dict(r.json()["predictions"][0])
        assert got.keys() == want.keys()
        assert max(abs(got[k] - want[k]) for k in want) < 1e-5
    r = shared_server.client.post("/v1/predict", json={"inputs": TEXTS})  # one request, padded together
    assert r.status_code == 200
    for pred, want in zip(r.json()["predictions"], expected, strict=True):
        got = as_dict(pred)
        assert max(abs(got[k] - want[k]) for k in want) < 1e-5
    scores = [p["score"] for p in r.json()["predictions"][0]]
    assert scores == sorted(scores, reverse=True)
    assert abs(sum(scores) - 1) < 1e-5


def test_64_concurrent_clients_all_correct_and_batched(start_server, tiny_bundle: Path) -> None:
    server = start_server(max_wait_ms=5)
    rng = random.Random(1)
    texts = [
        rng.choice(TEXTS) + " " + " ".join(rng.choices(["good", "bad", "okay", "film"], k=rng.randint(0, 30)))
        for _ in range(256)
    ]
    expected = reference_scores(tiny_bundle, texts)

    responses = server.predict_concurrently(texts, concurrency=64, timeout=60)
    assert [r.status_code for r in responses] == [200] * len(texts)
    for r, want in zip(responses, expected, strict=True):
        got = as_dict(r.json()["predictions"][0])
        assert max(abs(got[k] - want[k]) for k in want) < 1e-5
    batches = server.metric("bertserve_batch_size_count")
    sequences = server.metric("bertserve_batch_size_sum")
    assert sequences == len(texts)
    assert batches < len(texts), "no request was batched with another"
    assert server.metric("bertserve_batch_size_bucket", {"le": "1.0"}) < batches  # some batch had > 1


def test_top_k_and_truncation(shared_server) -> None:
    c = shared_server.client
    r = c.post("/v1/predict", json={"inputs": ["great", "awful"], "top_k": 1})
    assert r.status_code == 200
    assert [len(p) for p in r.json()["predictions"]] == [1, 1]
    r = c.post("/v1/predict", json={"inputs": "great", "top_k": 99})
    assert len(r.json()["predictions"][0]) == 3
    long_text = "word " * 500
    r = c.post("/v1/predict", json={"inputs": long_text, "truncate": False})
    assert r.status_code == 422
    assert r.json()["type"] == "text_too_long" and "64" in r.json()["error"]
    r = c.post("/v1/predict", json={"inputs": long_text, "truncate": True})
    assert r.status_code == 200
    assert len(r.json()["predictions"][0]) == 3
    r = c.post("/v1/predict", json={"inputs": "great", "top_k": 0})
    assert r.status_code == 422


def test_too_many_inputs_is_413(start_server) -> None:
    server = start_server(max_client_batch=4)
    r = server.client.post("/v1/predict", json={"inputs": ["a"] * 5})
    assert r.status_code == 413
    assert r.json() == {
        "error": "5 inputs exceed the limit of 4 per request",
        "type": "payload_too_large",
        "request_id": r.headers["x-request-id"],
    }
    assert server.client.post("/v1/predict", json={"inputs": ["a"] * 4}).status_code == 200


def test_full_queue_is_429_with_retry_after(start_server) -> None:
    server = start_server(max_queue=8, max_client_batch=64)
    r = server.client.post("/v1/predict", json={"inputs": ["good"] * 9})  # can never fit
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["type"] == "queue_full"

    async def flood() -> list[int]:
        async with httpx.AsyncClient(
            base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=200)
        ) as client:
            rs = await asyncio.gather(
                *(client.post("/v1/predict", json={"inputs": ["good film"] * 8}) for _ in range(200))
            )
            return [x.status_code for x in rs]

    codes = asyncio.run(flood())
    assert set(codes) <= {200, 429}
    assert 429 in codes and 200 in codes
    assert server.metric("bertserve_rejected_total", {"reason": "queue_full"}) >= codes.count(429)


def test_deadline_passed_is_504_and_costs_no_compute(start_server) -> None:
    server = start_server()
    before = server.metric("bertserve_batch_size_sum")
    r = server.client.post("/v1/predict", json={"inputs": ["good"] * 3, "timeout_s": 1e-9})
    assert r.status_code == 504
    assert r.json()["type"] == "deadline_exceeded"
    time.sleep(0.2)
    assert server.metric("bertserve_batch_size_sum") == before
    assert server.metric("bertserve_rejected_total", {"reason": "deadline"}) >= 1
    assert server.client.post("/v1/predict", json={"inputs": "good"}).status_code == 200


def test_503_before_ready(start_server) -> None:
    server = start_server(wait_ready=False, warmup_runs=300)
    server.wait("/healthz")
    assert server.client.get("/readyz").status_code == 503
    r = server.client.post("/v1/predict", json={"inputs": "good"})
    assert r.status_code == 503 and r.json()["type"] == "not_ready"
    assert server.client.get("/v2/health/ready").status_code == 503
    server.wait("/readyz")
    assert server.client.post("/v1/predict", json={"inputs": "good"}).status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_0(start_server) -> None:
    server = start_server(drain_delay_s=1.0)
    texts = [" ".join(["the film was good"] * 12)] * 8

    async def run() -> tuple[list[int], int, int]:
        async with httpx.AsyncClient(
            base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=100)
        ) as client:
            tasks = [asyncio.ensure_future(client.post("/v1/predict", json={"inputs": texts})) for _ in range(100)]
            while server.metric("bertserve_inflight_requests") < 50:  # requests admitted and in flight
                await asyncio.sleep(0.01)
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            ready = (await client.get("/readyz")).status_code
            during = (await client.post("/v1/predict", json={"inputs": "good"})).status_code
            return [r.status_code for r in await asyncio.gather(*tasks)], ready, during

    codes, ready_during_drain, predict_during_drain = asyncio.run(run())
    assert ready_during_drain == 503
    assert predict_during_drain == 200  # still served while load balancers take the pod out
    assert codes == [200] * 100, "a request admitted before SIGTERM was lost"
    assert server.proc.wait(30) == 0


def test_open_inference_protocol_with_tritonclient(shared_server, tiny_bundle: Path) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(shared_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny")
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"] for o in meta["outputs"]} == {"logits", "labels"}
    server_meta = client.get_server_metadata()
    assert "binary_tensor_data" in server_meta["extensions"]

    texts = TEXTS[:4]
    expected = reference_scores(tiny_bundle, texts)
    labels = json.loads((tiny_bundle / "manifest.json").read_text())["labels"]
    for binary in (True, False):
        inp = triton.InferInput("text", [len(texts)], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
        outputs = [
            triton.InferRequestedOutput("logits", binary_data=binary),
            triton.InferRequestedOutput("labels", binary_data=binary),
        ]
        result = client.infer("tiny", [inp], outputs=outputs)
        logits = result.as_numpy("logits")
        assert logits.shape == (len(texts), len(labels)) and logits.dtype == np.float32
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        for row, want in zip(probs, expected, strict=True):
            assert max(abs(row[i] - want[label]) for i, label in enumerate(labels)) < 1e-5
        got_labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("labels")]
        assert got_labels == [max(w, key=w.__getitem__) for w in expected]

    inp = triton.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"great"], dtype=object))
    top = client.infer("tiny", [inp], outputs=[triton.InferRequestedOutput("logits", class_count=2)])
    assert top.as_numpy("logits").shape == (1, 2)
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", [inp])
    with pytest.raises(InferenceServerException, match="no version"):
        client.infer("tiny", [inp], model_version="999")


def test_metrics_exposition_has_every_series(shared_server) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    shared_server.client.post("/v1/predict", json={"inputs": ["good", "bad"]})
    text = shared_server.client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    histograms = [
        "bertserve_request_duration_seconds",
        "bertserve_queue_duration_seconds",
        "bertserve_tokenize_duration_seconds",
        "bertserve_inference_duration_seconds",
        "bertserve_batch_size",
        "bertserve_batch_tokens",
        "bertserve_batch_padding_ratio",
    ]
    for name in histograms:
        assert families[name].type == "histogram", name
    for name in ("bertserve_queue_depth", "bertserve_inflight_requests"):
        assert families[name].type == "gauge", name
    for name in ("bertserve_requests", "bertserve_rejected"):
        assert families[name].type == "counter", name
    info = [s for s in families["bertserve_model_info"].samples]
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels["name"] == "tiny" and info[0].labels["provider"] == "CPUExecutionProvider"
    predict = [
        s
        for s in families["bertserve_request_duration_seconds"].samples
        if s.labels.get("endpoint") == "/v1/predict" and s.name.endswith("_count")
    ]
    assert predict and predict[0].labels["status"] == "200"
    # buckets fine enough for millisecond latencies
    les = {s.labels["le"] for s in families["bertserve_inference_duration_seconds"].samples if "le" in s.labels}
    assert {"0.001", "0.005", "0.01"} <= les


def test_models_endpoint_reports_real_providers_and_settings(shared_server) -> None:
    body = shared_server.client.get("/v1/models").json()
    assert body["name"] == "tiny"
    assert body["providers"] == ["CPUExecutionProvider"]
    assert body["labels"] == ["negative", "neutral", "positive"]
    assert body["max_length"] == 64
    assert body["batching"]["max_batch_size"] == 8
    assert set(body["variants"]) >= {"fp32"}
    assert body["variant"] == "fp32"
    batching = body["batching"]
    assert batching["inference_workers"] == 2 and batching["solo_threads"] == 2 * batching["intra_op_threads"]


def test_solo_session_can_be_turned_off_and_lone_requests_still_match(start_server, tiny_bundle: Path) -> None:
    server = start_server(solo_threads=1)
    assert server.client.get("/v1/models").json()["batching"]["solo_threads"] is None
    (want,) = reference_scores(tiny_bundle, TEXTS[:1])
    got = as_dict(server.client.post("/v1/predict", json={"inputs": TEXTS[0]}).json()["predictions"][0])
    assert max(abs(got[k] - want[k]) for k in want) < 1e-5


def test_disconnected_client_is_dropped_before_compute(start_server) -> None:
    import socket

    server = start_server(max_batch_size=1, max_queue=4096)
    long_text = " ".join(["the film was good"] * 20)
    backlog = {"inputs": [long_text] * 64}

    async def run() -> list[int]:
        async with httpx.AsyncClient(
            base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=20)
        ) as client:
            tasks = [asyncio.ensure_future(client.post("/v1/predict", json=backlog)) for _ in range(20)]
            while server.metric("bertserve_queue_depth") < 200:  # a backlog of hundreds of batches
                await asyncio.sleep(0.01)
            body = json.dumps({"inputs": ["gone before compute"] * 3}).encode()
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(
                    b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            return [r.status_code for r in await asyncio.gather(*tasks)]

    assert asyncio.run(run()) == [200] * 20
    deadline = time.monotonic() + 10
    while server.metric("bertserve_rejected_total", {"reason": "disconnected"}) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("bertserve_rejected_total", {"reason": "disconnected"}) == 1
    assert server.metric("bertserve_batch_size_sum") == 20 * 64  # the 3 abandoned inputs cost no compute
    assert server.client.post("/v1/predict", json={"inputs": "good"}).status_code == 200
