"""Triton's HTTP extensions against a real server, through tritonclient.http where it has a call for them:
model configuration (what perf_analyzer reads first), statistics, the repository extension and its API key.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.conftest import Server

MODEL = "tiny"
KEY = "triton-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}  # pass copies: tritonclient.http adds Content-Length to the dict given


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[Server]:
    srv = Server(
        tiny_bundle,
        tmp_path_factory.mktemp("triton") / "server.log",
        grpc_port=0,
        api_key=KEY,
        max_batch_size=4,
        max_wait_ms=2,
        inference_workers=2,
    )
    yield srv
    srv.close()


def http_client(server: Server) -> Any:
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


def infer(server: Server, texts: list[str]) -> Any:
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("text", [len(texts), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    return http_client(server).infer(MODEL, [inp], headers=dict(AUTH))


def test_server_metadata_lists_exactly_the_extensions(server: Server) -> None:
    extensions = server.client.get("/v2").json()["extensions"]
    assert {"model_configuration", "statistics", "model_repository"} <= set(extensions)
    assert len(extensions) == len(set(extensions))


def test_model_config_reports_the_real_batching_and_matches_metadata(server: Server) -> None:
    config = http_client(server).get_model_config(MODEL)
    assert config == server.client.get(f"/v2/models/{MODEL}/versions/1/config").json()
    assert config["name"] == MODEL and config["platform"] == "onnxruntime_onnx"
    assert config["dynamic_batching"]["preferred_batch_size"] == [4]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert config["instance_group"][0]["count"] == 2 and config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    [text] = config["input"]
    assert text["name"] == "text" and text["data_type"] == "TYPE_STRING"
    outputs = {o["name"]: o for o in config["output"]}
    assert outputs["logits"]["data_type"] == "TYPE_FP32" and outputs["logits"]["dims"][-1] == 3
    assert outputs["labels"]["data_type"] == "TYPE_STRING"
    # the config and the metadata describe the same tensor: batched ([-1] + dims) or not (dims alone)
    meta_shape = server.client.get(f"/v2/models/{MODEL}").json()["inputs"][0]["shape"]
    expected = [-1, *text["dims"]] if config["max_batch_size"] > 0 else text["dims"]
    assert meta_shape == expected


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/nope/config",
        f"/v2/models/{MODEL}/versions/9/config",
        "/v2/models/nope/stats",
        f"/v2/models/{MODEL}/versions/9/stats",
    ],
)
def test_unknown_model_or_version_is_404(server: Server, path: str) -> None:
    r = server.client.get(path)
    assert r.status_code == 404 and r.json()["error"], r.text


def test_statistics_count_what_was_served(server: Server) -> None:
    before = http_client(server).get_inference_statistics(MODEL)["model_stats"][0]
    infer(server, ["a great film", "awful", "fine"])
    infer(server, ["ok"])
    stats = http_client(server).get_inference_statistics(MODEL)
    [after] = stats["model_stats"]
    assert after["name"] == MODEL and after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 4
    ok = after["inference_stats"]["success"]
    assert ok["count"] - before["inference_stats"]["success"]["count"] == 2 and ok["ns"] > 0
    assert after["inference_stats"]["fail"]["count"] == 0
    assert after["inference_stats"]["compute_infer"]["ns"] > 0 and after["execution_count"] >= 1
    assert after["last_inference"] > 1.6e12  # ms since the epoch
    every = server.client.get("/v2/models/stats").json()["model_stats"]
    assert [s["name"] for s in every] == [MODEL]
    assert server.client.get(f"/v2/models/{MODEL}/versions/1/stats").json()["model_stats"][0]["version"] == "1"


def test_repository_index_needs_the_key(server: Server) -> None:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="API key"):
        http_client(server).get_model_repository_index()
    index = http_client(server).get_model_repository_index(headers=dict(AUTH))
    assert index == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]
    r = server.client.post("/v2/repository/index", json={"ready": True}, headers=dict(AUTH))
    assert r.status_code == 200 and len(r.json()) == 1
    r = server.client.post("/v2/repository/index", content=b"{nope", headers=dict(AUTH))
    assert r.status_code == 400


def test_load_and_unload_need_a_repository_and_the_key(server: Server) -> None:
    from tritonclient.utils import InferenceServerException

    client = http_client(server)
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException, match="API key"):
            call(MODEL)
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException, match="MODEL_REPOSITORY"):
            call(MODEL, headers=dict(AUTH))
    assert server.client.get("/readyz").status_code == 200
