"""Bad input over real HTTP: every malformed request gets a JSON 4xx that names the problem; the server stays up
and its memory stays flat.

One table, BAD_INPUTS, drives the native API, the Open Inference Protocol v2 (JSON and binary tensor data) and
routing errors. Each entry is a distinct bad input; ``test_bad_inputs_leave_server_alive_and_memory_flat``
prints how many were tried (the issue's closing note reports that count). Bodies over the size limit are also
sent as a stream without Content-Length, to show they are refused before being read whole.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import pytest

from service.config import Settings

MODEL = "tiny"  # the tiny_bundle fixture's name and version
VERSION = "1"
MAX_LENGTH = 64
MAX_CLIENT_BATCH = Settings.model_fields["max_client_batch"].default
MAX_BODY = Settings.model_fields["max_body_bytes"].default
LONG_TEXT = "word " * 400  # far more than MAX_LENGTH tokens
JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class Bad:
    """One bad request and the error it must produce."""

    id: str
    body: bytes
    status: int
    needles: tuple[str, ...]  # substrings the error message must contain (case-insensitive)
    path: str = "/v1/predict"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    kind: str | None = None  # expected "type", when it matters


def j(value: Any) -> bytes:
    return json.dumps(value).encode()


def predict(value: Any, status: int, *needles: str, kind: str | None = None, id: str) -> Bad:
    return Bad(id, j(value), status, needles, kind=kind)


def v2_input(
    data: Any = None, *, name: str = "text", datatype: str = "BYTES", shape: list[int] | None = None, **params: Any
) -> dict[str, Any]:
    tensor: dict[str, Any] = {
        "name": name,
        "datatype": datatype,
        "shape": shape if shape is not None else [len(data or [])],
    }
    if data is not None:
        tensor["data"] = data
    if params:
        tensor["parameters"] = params
    return tensor


def v2(payload: Any, status: int, *needles: str, id: str, model: str = MODEL, kind: str | None = None) -> Bad:
    return Bad(id, j(payload), status, needles, path=f"/v2/models/{model}/infer", kind=kind)


def bytes_tensor(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def v2_binary(
    header: dict[str, Any], binary: bytes, status: int, *needles: str, id: str, header_length: str | None = None
) -> Bad:
    head = j(header)
    length = header_length if header_length is not None else str(len(head))
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": length}
    return Bad(id, head + binary, status, needles, path=f"/v2/models/{MODEL}/infer", headers=headers)


def binary_header(size: int | Any, shape: list[int] | None = None) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": shape or [1], "parameters": {"binary_data_size": size}}
        ]
    }


def nested(depth: int) -> bytes:
    """``[[[..."a"...]]]`` as JSON text (the stdlib encoder would hit Python's recursion limit first)."""
    return b"[" * depth + b'"a"' + b"]" * depth


OK_BIN = bytes_tensor(b"a great film")

BAD_INPUTS: list[Bad] = [
    # -- not JSON, or not JSON we accept ------------------------------------------------------------------
    Bad("invalid-json-truncated", b'{"inputs": "a"', 400, ("not valid JSON",), kind="bad_request"),
    Bad("invalid-json-garbage", b"inputs=hello", 400, ("not valid JSON",)),
    Bad("invalid-json-trailing-comma", b'{"inputs": "a",}', 400, ("not valid JSON",)),
    Bad("invalid-json-nan", b'{"inputs": "a", "timeout_s": NaN}', 400, ("not valid JSON",)),
    Bad("invalid-json-infinite-number", b'{"inputs": "a", "top_k": 1e400}', 400, ("not valid JSON",)),
    Bad("invalid-json-single-quotes", b"{'inputs': 'a'}", 400, ("not valid JSON",)),
    Bad("empty-body", b"", 400, ("empty",)),
    Bad(
        "wrong-content-type-text",
        b'{"inputs": "a"}',
        415,
        ("content type", "text/plain"),
        headers={"content-type": "text/plain"},
        kind="unsupported_media_type",
    ),
    Bad(
        "wrong-content-type-form",
        b"inputs=a",
        415,
        ("content type",),
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    Bad(
        "wrong-content-type-xml",
        b"<inputs>a</inputs>",
        415,
        ("content type",),
        headers={"content-type": "application/xml"},
    ),
    Bad("invalid-utf8-bytes", b'{"inputs": "\xff\xfe bad"}', 400, ("UTF-8",)),
    Bad("lone-surrogate-escape", b'{"inputs": "\\ud800"}', 400, ("surrogate",)),
    Bad("raw-nul-byte-in-string", b'{"inputs": "a\x00b"}', 400, ("control character",)),
    Bad("deeply-nested-body", nested(5000), 400, ("depth",)),
    Bad("deeply-nested-inputs", b'{"inputs": ' + nested(5000) + b"}", 400, ("depth",)),
    # -- valid JSON, wrong shape or types --------------------------------------------------------------------
    predict({}, 422, "inputs", "required", id="missing-inputs", kind="validation_error"),
    predict({"text": "a"}, 422, "inputs", id="missing-inputs-wrong-name"),
    predict({"inputs": "a", "modle": "tiny"}, 422, "modle", "extra", id="extra-field"),
    predict({"inputs": "a", "model": "other"}, 404, "unknown model", "other", id="unknown-model", kind="not_found"),
    predict({"inputs": "a", **{f"k{i}": i for i in range(2000)}}, 422, "extra", id="thousands-of-extra-fields"),
    predict({"inputs": "a", "top_k": "3"}, 422, "top_k", id="top-k-string"),
    predict({"inputs": "a", "top_k": 1.5}, 422, "top_k", id="top-k-fraction"),
    predict({"inputs": "a", "top_k": True}, 422, "top_k", id="top-k-bool"),
    predict({"inputs": "a", "top_k": -2}, 422, "top_k", id="top-k-negative"),
    predict({"inputs": "a", "truncate": "false"}, 422, "truncate", id="truncate-string"),
    predict({"inputs": "a", "truncate": 0}, 422, "truncate", id="truncate-int"),
    predict({"inputs": "a", "timeout_s": -1}, 422, "timeout_s", id="timeout-negative"),
    predict({"inputs": "a", "timeout_s": "soon"}, 422, "timeout_s", id="timeout-string"),
    predict({"inputs": "a", "timeout_s": "5"}, 422, "timeout_s", id="timeout-numeric-string"),
    predict({"inputs": "a", "timeout_s": True}, 422, "timeout_s", id="timeout-bool"),
    predict({"inputs": 42}, 422, "inputs", id="inputs-number"),
    predict({"inputs": True}, 422, "inputs", id="inputs-bool"),
    predict({"inputs": None}, 422, "inputs", id="inputs-null"),
    predict({"inputs": {"text": "a"}}, 422, "inputs", id="inputs-object"),
    predict({"inputs": [1, 2]}, 422, "inputs", id="inputs-list-of-numbers"),
    predict({"inputs": ["a", None]}, 422, "inputs", id="inputs-list-with-null"),
    predict({"inputs": [["a"]]}, 422, "inputs", id="inputs-nested-list"),
    Bad("inputs-nested-under-parser-limit", b'{"inputs": ' + nested(900) + b"}", 422, ("inputs",)),
    predict(["a great film"], 422, "", id="body-is-array"),
    predict("a great film", 422, "", id="body-is-string"),
    predict(3, 422, "", id="body-is-number"),
    predict(None, 422, "", id="body-is-null"),
    # -- valid types, unacceptable values -------------------------------------------------------------------
    predict({"inputs": ""}, 422, "empty", id="empty-string"),
    predict({"inputs": " \n\t "}, 422, "empty", id="whitespace-string"),
    predict({"inputs": []}, 422, "empty", id="empty-list"),
    predict({"inputs": ["a fine day", ""]}, 422, "input 1", "empty", id="list-with-empty-string"),
    predict({"inputs": "a\u0000b"}, 422, "NUL", id="escaped-nul-character"),
    predict({"inputs": ["ok", "a\u0000"]}, 422, "input 1", "NUL", id="nul-in-second-input"),
    predict(
        {"inputs": ["a"] * (MAX_CLIENT_BATCH + 1)},
        413,
        f"{MAX_CLIENT_BATCH + 1} inputs",
        str(MAX_CLIENT_BATCH),
        id="too-many-inputs",
        kind="payload_too_large",
    ),
    predict({"inputs": ["a"] * 10_000}, 413, "10000 inputs", id="far-too-many-inputs"),
    predict({"inputs": "a" * (MAX_BODY + 1)}, 413, "exceeds the limit", str(MAX_BODY), id="body-too-large"),
    predict(
        {"inputs": LONG_TEXT, "truncate": False},
        422,
        str(MAX_LENGTH),
        "truncate",
        id="text-too-long-no-truncate",
        kind="text_too_long",
    ),
    predict(
        {"inputs": ["short", LONG_TEXT], "truncate": False},
        422,
        "input 1",
        str(MAX_LENGTH),
        id="second-text-too-long-no-truncate",
    ),
    # -- routing ---------------------------------------------------------------------------------------------
    Bad("wrong-method", b"", 405, ("method not allowed",), method="GET"),
    Bad("unknown-path", j({"inputs": "a"}), 404, ("not found",), path="/v1/predictions"),
    # -- Open Inference Protocol v2 --------------------------------------------------------------------------
    v2({"inputs": [v2_input(["a"])]}, 404, "unknown model", "nope", id="v2-unknown-model", model="nope"),
    Bad(
        "v2-unknown-version",
        j({"inputs": [v2_input(["a"])]}),
        404,
        ("no version", "999"),
        path=f"/v2/models/{MODEL}/versions/999/infer",
        kind="not_found",
    ),
    Bad("v2-unknown-model-metadata", b"", 404, ("unknown model",), method="GET", path="/v2/models/nope"),
    Bad(
        "v2-unknown-version-ready", b"", 404, ("no version",), method="GET", path=f"/v2/models/{MODEL}/versions/7/ready"
    ),
    v2({"inputs": [v2_input(["a"], datatype="FP32")]}, 400, "datatype", "FP32", id="v2-datatype-fp32"),
    v2({"inputs": [v2_input([1], datatype="INT64")]}, 400, "datatype", id="v2-datatype-int64"),
    v2({"inputs": [v2_input(["a"], datatype="bytes")]}, 400, "datatype", id="v2-datatype-lowercase"),
    v2({"inputs": [v2_input([["a", "b"], ["c", "d"]], shape=[2, 2])]}, 400, "shape", id="v2-shape-2x2"),
    v2({"inputs": [v2_input([[["a"]]], shape=[1, 1, 1])]}, 400, "shape", id="v2-shape-3d"),
    v2({"inputs": [v2_input(["a"], shape=[-1])]}, 400, "shape", id="v2-shape-negative"),
    v2({"inputs": [v2_input(["a"], shape=[])]}, 400, "shape", id="v2-shape-scalar"),
    v2({"inputs": [v2_input(["a", "b"], shape=[3])]}, 400, "shape", "2 elements", id="v2-shape-count-mismatch"),
    v2({"inputs": [v2_input(["a"], name="input_ids")]}, 400, "unknown input", "input_ids", id="v2-input-name"),
    v2({"inputs": [v2_input(["a"]), v2_input(["b"])]}, 400, "exactly one input", id="v2-two-inputs"),
    v2({"inputs": []}, 422, "inputs", id="v2-no-inputs"),
    v2({}, 422, "inputs", id="v2-missing-inputs"),
    v2({"inputs": [v2_input(["a"])], "priority": 1}, 422, "priority", id="v2-extra-field"),
    v2({"inputs": [{"name": "text", "datatype": "BYTES"}]}, 422, "shape", id="v2-input-missing-shape"),
    v2({"inputs": [v2_input(["a"], shape=["one"])]}, 422, "shape", id="v2-shape-not-ints"),
    v2({"inputs": [v2_input([1, 2])]}, 400, "must be a string", id="v2-non-string-elements"),
    v2({"inputs": [v2_input([None])]}, 400, "must be a string", id="v2-null-element"),
    v2({"inputs": [v2_input(None, shape=[1])]}, 400, "neither data nor binary_data_size", id="v2-no-data"),
    v2({"inputs": [v2_input(["a"])], "outputs": [{"name": "probs"}]}, 400, "unknown output", id="v2-output-name"),
    v2({"inputs": [v2_input(["a"])], "parameters": {"truncate": "yes"}}, 400, "truncate", id="v2-truncate-str"),
    v2({"inputs": [v2_input(["a"])], "parameters": {"timeout_s": -1}}, 400, "timeout_s", id="v2-timeout-neg"),
    v2(
        {"inputs": [v2_input(["a"])], "outputs": [{"name": "logits", "parameters": {"classification": 0}}]},
        400,
        "classification",
        id="v2-classification-zero",
    ),
    v2(
        {"inputs": [v2_input([LONG_TEXT])], "parameters": {"truncate": False}},
        422,
        str(MAX_LENGTH),
        id="v2-text-too-long-no-truncate",
    ),
    v2({"inputs": [v2_input(["a"] * (MAX_CLIENT_BATCH + 1))]}, 413, str(MAX_CLIENT_BATCH), id="v2-too-many"),
    v2({"inputs": [v2_input([""])]}, 422, "empty", id="v2-empty-string"),
    v2({"inputs": [v2_input(["a\u0000"])]}, 422, "NUL", id="v2-nul-in-json-data"),
    v2({"inputs": [v2_input(["a" * (MAX_BODY + 1)])]}, 413, "exceeds the limit", id="v2-body-too-large"),
    Bad("v2-invalid-json", b'{"inputs": [', 400, ("not valid JSON",), path=f"/v2/models/{MODEL}/infer"),
    Bad("v2-empty-body", b"", 400, ("not valid JSON",), path=f"/v2/models/{MODEL}/infer"),
    # -- v2 binary tensor data (Triton's extension, what tritonclient sends by default) ----------------------
    v2_binary(
        binary_header(len(OK_BIN)),
        OK_BIN,
        400,
        "Inference-Header-Content-Length",
        header_length="999999",
        id="v2-bin-header-length-past-body",
    ),
    v2_binary(
        binary_header(len(OK_BIN)),
        OK_BIN,
        400,
        "Inference-Header-Content-Length",
        header_length="abc",
        id="v2-bin-header-length-not-a-number",
    ),
    v2_binary(
        binary_header(len(OK_BIN)),
        OK_BIN,
        400,
        "Inference-Header-Content-Length",
        header_length="-5",
        id="v2-bin-header-length-negative",
    ),
    v2_binary(
        binary_header(len(OK_BIN)),
        OK_BIN,
        400,
        "not valid JSON",
        header_length="20",
        id="v2-bin-header-length-cuts-json",
    ),
    v2_binary(binary_header(len(OK_BIN) + 50), OK_BIN, 400, "binary_data_size", id="v2-bin-size-past-data"),
    v2_binary(binary_header(-1), OK_BIN, 400, "binary_data_size", id="v2-bin-size-negative"),
    v2_binary(binary_header("16"), OK_BIN, 400, "binary_data_size", id="v2-bin-size-not-int"),
    v2_binary(binary_header(3), b"\x05\x00\x00", 400, "truncated", id="v2-bin-truncated-length-prefix"),
    v2_binary(binary_header(9), struct.pack("<I", 100) + b"short", 400, "truncated", id="v2-bin-truncated-item"),
    v2_binary(binary_header(8), bytes_tensor(b"\xff\xfe\xfd\xfc"), 400, "UTF-8", id="v2-bin-invalid-utf8"),
    v2_binary(binary_header(9), bytes_tensor(b"ab\x00cd"), 422, "NUL", id="v2-bin-nul-byte"),
    v2_binary(binary_header(len(OK_BIN), shape=[2]), OK_BIN, 400, "shape", id="v2-bin-count-mismatch"),
    # -- Triton's extensions: configuration, statistics, repository (service/frontend/protocols/v2_http.py) --
    Bad("triton-config-unknown-model", b"", 404, ("unknown model",), method="GET", path="/v2/models/nope/config"),
    Bad(
        "triton-config-unknown-version",
        b"",
        404,
        ("no version",),
        method="GET",
        path=f"/v2/models/{MODEL}/versions/9/config",
    ),
    Bad("triton-stats-unknown-model", b"", 404, ("unknown model",), method="GET", path="/v2/models/nope/stats"),
    Bad(
        "triton-stats-unknown-version",
        b"",
        404,
        ("no version",),
        method="GET",
        path=f"/v2/models/{MODEL}/versions/9/stats",
    ),
    Bad("triton-index-invalid-json", b"{nope", 400, ("not valid JSON",), path="/v2/repository/index"),
    Bad("triton-index-body-array", b"[]", 400, ("JSON object",), path="/v2/repository/index"),
    Bad("triton-index-ready-not-bool", j({"ready": "yes"}), 400, ("ready",), path="/v2/repository/index"),
    Bad("triton-load-without-repository", b"", 422, ("MODEL_REPOSITORY",), path=f"/v2/repository/models/{MODEL}/load"),
    Bad("triton-unload-without-repository", b"", 422, ("MODEL_REPOSITORY",), path="/v2/repository/models/nope/unload"),
    Bad(
        "triton-load-wrong-method",
        b"",
        405,
        ("method not allowed",),
        method="GET",
        path=f"/v2/repository/models/{MODEL}/load",
    ),
]


def send(client: httpx.Client, bad: Bad) -> httpx.Response:
    return client.request(bad.method, bad.path, content=bad.body, headers=bad.headers)


def assert_json_error(r: httpx.Response, bad: Bad) -> None:
    assert r.status_code == bad.status, f"{bad.id}: expected {bad.status}, got {r.status_code}: {r.text[:500]}"
    assert r.headers.get("content-type", "").startswith("application/json"), f"{bad.id}: {r.headers}"
    body = r.json()
    shape = {"error", "type", "request_id"}
    assert isinstance(body, dict) and set(body) == shape, f"{bad.id}: not the error shape: {body}"
    assert isinstance(body["error"], str) and body["error"].strip(), f"{bad.id}: empty error message"
    assert isinstance(body["type"], str) and body["type"], f"{bad.id}: empty error type"
    for needle in bad.needles:
        assert needle.lower() in body["error"].lower(), f"{bad.id}: {needle!r} not in {body['error']!r}"
    if bad.kind is not None:
        assert body["type"] == bad.kind, f"{bad.id}: type {body['type']!r}, expected {bad.kind!r}"
    assert len(r.content) < 4096, f"{bad.id}: error body of {len(r.content)} bytes echoes too much input"


def rss(server: Any) -> int:
    return int(psutil.Process(server.proc.pid).memory_info().rss)


def test_bad_input_table_has_distinct_cases() -> None:
    ids = [b.id for b in BAD_INPUTS]
    assert len(ids) == len(set(ids))
    bodies = [(b.method, b.path, b.body, tuple(sorted(b.headers.items()))) for b in BAD_INPUTS]
    assert len(bodies) == len(set(bodies)), "two table entries send the very same request"


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.id for b in BAD_INPUTS])
def test_bad_input_is_a_json_4xx_naming_the_problem(shared_server: Any, bad: Bad) -> None:
    assert_json_error(send(shared_server.client, bad), bad)
    assert shared_server.client.get("/healthz").status_code == 200


def test_long_text_with_truncate_true_is_served(shared_server: Any) -> None:
    r = shared_server.client.post("/v1/predict", json={"inputs": ["short", LONG_TEXT], "truncate": True})
    assert r.status_code == 200, r.text
    assert [len(p) for p in r.json()["predictions"]] == [3, 3]
    payload = {"inputs": [v2_input([LONG_TEXT])], "parameters": {"truncate": True}}
    r = shared_server.client.post(f"/v2/models/{MODEL}/infer", json=payload)
    assert r.status_code == 200, r.text


def test_well_formed_binary_v2_request_is_served(shared_server: Any) -> None:
    """The control for the binary cases: the same framing, done right, is a 200."""
    head = j(binary_header(len(OK_BIN)))
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}
    r = shared_server.client.post(f"/v2/models/{MODEL}/infer", content=head + OK_BIN, headers=headers)
    assert r.status_code == 200, r.text
    assert {o["name"] for o in r.json()["outputs"]} == {"logits", "labels"}


# -- bodies over the limit are refused before they are read whole -------------------------------------------
def _stream_then_read(port: int, head: bytes, chunk: bytes, total: int, pace_s: float) -> tuple[int, int, float]:
    """Send ``head`` then ``chunk`` repeatedly (up to ``total`` bytes) from a thread while this thread waits
    for the response. Returns (status, bytes sent when the status line arrived, seconds)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sent = [0]
    stop = threading.Event()

    def writer() -> None:
        try:
            sock.sendall(head)
            while sent[0] < total and not stop.is_set():
                sock.sendall(chunk)
                sent[0] += len(chunk)
                if pace_s:
                    time.sleep(pace_s)
        except OSError:  # the server closed the connection after answering: expected
            pass

    started = time.monotonic()
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        data = b""
        while b"\r\n" not in data:
            part = sock.recv(65536)
            if not part:
                break
            data += part
        at_response = sent[0]
    finally:
        stop.set()
        elapsed = time.monotonic() - started
        sock.close()
        thread.join(10)
    assert data.startswith(b"HTTP/1.1 "), f"no HTTP response, got {data[:200]!r}"
    return int(data[9:12]), at_response, elapsed


def test_declared_oversized_body_is_refused_before_it_is_sent(shared_server: Any) -> None:
    """Content-Length over the limit: 413 at once, although almost none of the body was sent."""
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {50 * MAX_BODY}\r\n\r\n"
    ).encode()
    status, sent, elapsed = _stream_then_read(shared_server.port, head, b'{"inputs": "', 12, pace_s=0)
    assert status == 413
    assert sent < MAX_BODY and elapsed < 5


@pytest.mark.parametrize("path", ["/v1/predict", f"/v2/models/{MODEL}/infer"])
def test_chunked_oversized_body_is_refused_before_it_is_read_whole(shared_server: Any, path: str) -> None:
    """No Content-Length (chunked): the server must stop at the limit, not buffer the whole stream first.

    The stream is paced at ~20 MB/s, so all of it would take over 12 s; the limit is reached in ~50 ms. (What the
    writer hands to the kernel is not what the server read: loopback buffers can hold tens of MB.)"""
    total = 256 * MAX_BODY
    piece = b"a" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + b'5\r\n{"a":\r\n'
    before = rss(shared_server)
    status, sent, elapsed = _stream_then_read(shared_server.port, head, chunk, total, pace_s=0.003)
    assert status == 413
    assert elapsed < 3.0, f"the 413 took {elapsed:.1f} s: the body was read well past the limit"
    assert sent < 48 * MAX_BODY, f"the 413 came only after {sent} bytes (limit {MAX_BODY})"
    assert rss(shared_server) - before < 8 * MAX_BODY
    assert shared_server.client.get("/healthz").status_code == 200


# -- the server survives all of it, and its memory stays flat ------------------------------------------------
def test_bad_inputs_leave_server_alive_and_memory_flat(shared_server: Any) -> None:
    """Liveness and memory only: whether each answer is the right 4xx is the parametrized test's job."""
    client = shared_server.client
    for bad in BAD_INPUTS:  # warm: first-time allocations (caches, pools) are not growth
        send(client, bad)
    before = rss(shared_server)
    rounds = 4
    statuses: dict[int, int] = {}
    started = time.monotonic()
    for _ in range(rounds):
        for bad in BAD_INPUTS:
            r = send(client, bad)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    seconds = time.monotonic() - started
    after = rss(shared_server)
    sent = rounds * len(BAD_INPUTS)
    print(
        f"\nbad inputs: {len(BAD_INPUTS)} distinct, {sent + len(BAD_INPUTS)} requests sent "
        f"({sent} in {seconds:.1f} s measured), statuses {dict(sorted(statuses.items()))}; "
        f"server RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB"
    )
    assert not [s for s in statuses if s >= 500], f"5xx answers to bad input: {statuses}"
    assert after - before < 16 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MiB over {sent} bad requests"
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    r = client.post("/v1/predict", json={"inputs": "a great film"})
    assert r.status_code == 200 and r.json()["predictions"][0][0]["label"]
    assert shared_server.proc.poll() is None
    assert "Traceback" not in shared_server.log(), shared_server.log()[-3000:]
    five_xx = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for f in _families(client)
        if f.name == "bertserve_requests"
        for s in f.samples
        if s.name == "bertserve_requests_total"
        and s.labels["status"].startswith("5")
        and s.labels["endpoint"] != "/readyz"  # the fixture polls readiness (503) until the model is warm
    }
    assert not five_xx, f"the server answered 5xx during the bad-input tests: {five_xx}\n{shared_server.log()[-3000:]}"


def _families(client: httpx.Client) -> list[Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(client.get("/metrics").text))
