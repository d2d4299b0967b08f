"""TEI's ``POST /predict`` and vLLM's ``POST /classify`` over real HTTP (httpx, as their clients send them):
response shapes, the same scores as the native API, timing headers, auth, and every bad input answered in the
dialect's own error shape with a 4xx.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Server

KEY = "dialect-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG_TEXT = "word " * 400
TIMING = ("x-request-id", "x-total-time", "x-tokenize-time", "x-queue-time", "x-inference-time")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[Server]:
    srv = Server(tiny_bundle, tmp_path_factory.mktemp("dialects") / "server.log", grpc_port=0, api_key=KEY)
    srv.client.headers.update(AUTH)
    yield srv
    srv.close()


def native(server: Server, texts: list[str], raw: bool = False) -> list[dict[str, float]]:
    r = server.client.post("/v1/predict", json={"inputs": texts, "raw_scores": raw})
    return [{p["label"]: p["score"] for p in row} for row in r.json()["predictions"]]


# -- TEI ----------------------------------------------------------------------------------------------------
def test_tei_one_input_is_one_sorted_list(server: Server) -> None:
    r = server.client.post("/predict", json={"inputs": "a great film"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list) and {tuple(sorted(p)) for p in body} == {("label", "score")}
    scores = [p["score"] for p in body]
    assert scores == sorted(scores, reverse=True) and math.isclose(sum(scores), 1.0, rel_tol=1e-5)
    assert {p["label"]: p["score"] for p in body} == pytest.approx(native(server, ["a great film"])[0])
    assert all(h in r.headers for h in TIMING)


def test_tei_batch_and_raw_scores(server: Server) -> None:
    texts = ["a great film", "awful, boring", "fine I guess"]
    r = server.client.post("/predict", json={"inputs": texts, "raw_scores": True, "truncate": True})
    assert r.status_code == 200, r.text
    rows = r.json()
    assert len(rows) == 3 and all(len(row) == 3 for row in rows)
    assert [{p["label"]: p["score"] for p in row} for row in rows] == [
        pytest.approx(x) for x in native(server, texts, raw=True)
    ]


def test_tei_truncate_defaults_to_false_as_in_tei(server: Server) -> None:
    r = server.client.post("/predict", json={"inputs": LONG_TEXT})
    assert r.status_code == 422 and r.json()["error_type"] == "tokenizer", r.text
    assert server.client.post("/predict", json={"inputs": LONG_TEXT, "truncate": True}).status_code == 200


# -- vLLM ---------------------------------------------------------------------------------------------------
def test_vllm_classify_response(server: Server) -> None:
    texts = ["a great film", "awful, boring"]
    r = server.client.post("/classify", json={"model": "tiny", "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["object"] == "list" and body["model"] == "tiny" and body["id"].startswith("classify-")
    expected = native(server, texts)
    for i, item in enumerate(body["data"]):
        assert item["index"] == i and item["num_classes"] == 3
        assert math.isclose(sum(item["probs"]), 1.0, rel_tol=1e-5)
        assert item["label"] == max(expected[i], key=expected[i].__getitem__)
        assert sorted(item["probs"]) == pytest.approx(sorted(expected[i].values()))
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(texts)
    assert all(h in r.headers for h in TIMING)
    one = server.client.post("/classify", json={"input": "fine"}).json()  # model may be left out
    assert len(one["data"]) == 1


def test_vllm_unknown_model_is_404_in_vllm_shape(server: Server) -> None:
    r = server.client.post("/classify", json={"model": "gpt-9", "input": "x"})
    assert r.status_code == 404
    assert r.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


def test_openapi_documents_the_dialects(server: Server) -> None:
    paths = server.client.get("/openapi.json").json()["paths"]
    assert "post" in paths["/predict"] and "post" in paths["/classify"]


# -- bad input: a 4xx in the dialect's shape, never a 5xx --------------------------------------------------
TEI_BAD: list[tuple[str, Any, int, str]] = [
    ("empty-string", {"inputs": ""}, 422, "empty"),
    ("whitespace", {"inputs": "  "}, 422, "empty"),
    ("empty-list", {"inputs": []}, 422, "empty"),
    ("number", {"inputs": 3}, 422, "validation"),
    ("null", {"inputs": None}, 422, "validation"),
    ("missing", {}, 422, "validation"),
    ("list-of-numbers", {"inputs": [1, 2]}, 422, "validation"),
    ("nested-too-deep", {"inputs": [[["a"]]]}, 422, "validation"),
    ("truncate-string", {"inputs": "a", "truncate": "yes"}, 422, "validation"),
    ("raw-scores-int", {"inputs": "a", "raw_scores": 1}, 422, "validation"),
    ("direction-left", {"inputs": "a", "truncation_direction": "Left"}, 422, "validation"),
    ("direction-bad", {"inputs": "a", "truncation_direction": 5}, 422, "validation"),
    ("unknown-field", {"inputs": "a", "normalize": True}, 422, "validation"),
    ("unknown-model", {"inputs": "a", "model": "nope"}, 404, "validation"),
    ("model-number", {"inputs": "a", "model": 3}, 422, "validation"),
    ("nul", {"inputs": "a\u0000b"}, 422, "validation"),
    ("too-many", {"inputs": ["a"] * 65}, 413, "validation"),
    ("body-array", ["a"], 422, "validation"),
    ("body-string", "a", 422, "validation"),
]
VLLM_BAD: list[tuple[str, Any, int]] = [
    ("empty-string", {"input": ""}, 422),
    ("missing-input", {"model": "tiny"}, 422),
    ("input-number", {"input": 5}, 422),
    ("input-pairs", {"input": [["a", "b"]]}, 422),
    ("input-null", {"input": None}, 422),
    ("empty-list", {"input": []}, 422),
    ("unknown-model", {"model": "nope", "input": "a"}, 404),
    ("model-number", {"model": 1, "input": "a"}, 422),
    ("truncate-zero", {"input": "a", "truncate_prompt_tokens": 0}, 422),
    ("truncate-string", {"input": "a", "truncate_prompt_tokens": "all"}, 422),
    ("truncate-short", {"input": "a", "truncate_prompt_tokens": 5}, 422),
    ("too-long", {"input": LONG_TEXT}, 422),
    ("too-many", {"input": ["a"] * 65}, 413),
    ("body-array", ["a"], 422),
]
RAW_BAD: list[tuple[str, bytes, dict[str, str], int]] = [
    ("invalid-json", b'{"inputs": ', {"content-type": "application/json"}, 400),
    ("empty-body", b"", {"content-type": "application/json"}, 400),
    ("not-json", b"inputs=a", {"content-type": "application/x-www-form-urlencoded"}, 415),
    ("too-large", b'{"inputs": "' + b"a" * (1 << 21) + b'"}', {"content-type": "application/json"}, 413),
]


@pytest.mark.parametrize(("case", "body", "status", "kind"), TEI_BAD, ids=[c[0] for c in TEI_BAD])
def test_tei_bad_input(server: Server, case: str, body: Any, status: int, kind: str) -> None:
    r = server.client.post("/predict", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error", "error_type"} and err["error"] and err["error_type"] == kind, err


@pytest.mark.parametrize(("case", "body", "status"), VLLM_BAD, ids=[c[0] for c in VLLM_BAD])
def test_vllm_bad_input(server: Server, case: str, body: Any, status: int) -> None:
    r = server.client.post("/classify", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == status, err


@pytest.mark.parametrize(("case", "body", "headers", "status"), RAW_BAD, ids=[c[0] for c in RAW_BAD])
@pytest.mark.parametrize("path", ["/predict", "/classify"])
def test_malformed_bodies(
    server: Server, path: str, case: str, body: bytes, headers: dict[str, str], status: int
) -> None:
    r = server.client.post(path, content=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()
    assert ("error_type" in err) if path == "/predict" else (err["error"]["code"] == status), err


@pytest.mark.parametrize("path", ["/predict", "/classify"])
def test_the_key_is_required(server: Server, path: str) -> None:
    r = httpx.post(server.url + path, json={"inputs": "a", "input": "a"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(server.url + path, json={"inputs": "a"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_server_survived_and_answered_no_5xx(server: Server) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    five_xx = [
        s
        for f in text_string_to_metric_families(server.client.get("/metrics").text)
        for s in f.samples
        if s.name == "bertserve_requests_total"
        and s.labels["status"].startswith("5")
        and s.labels["endpoint"] in ("/predict", "/classify")
    ]
    assert not five_xx, five_xx
    assert "Traceback" not in server.log()
