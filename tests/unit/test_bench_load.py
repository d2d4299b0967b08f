"""bench.load and bench.procs: wrk's result line, request bodies, CPU attribution, the command-line helpers, and one
real wrk run against the reference app (several bodies sent in turn, the server's CPU read around it)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pytest

from bench import load
from bench.procs import Server, free_port, ints, running, settings_env

LINE = (
    'WRK_JSON {"requests":10,"bytes":5,"duration_us":2000000,"errors":{"connect":0,"read":1,"write":0,"status":2,'
    '"timeout":0},"latency_us":{"mean":950.0,"max":4000,"p50":900,"p90":1500,"p99":2000,"p999":3900}}'
)


def test_parse_wrk_reads_the_scripts_json_line() -> None:
    result = load.parse_wrk("Running 2s test @ http://127.0.0.1:1/\n  10 requests in 2.00s\n" + LINE + "\n")
    assert result["requests"] == 10 and result["errors"]["status"] == 2 and result["latency_us"]["p99"] == 2000
    with pytest.raises(RuntimeError, match="no WRK_JSON"):
        load.parse_wrk("Running 2s test\n  10 requests in 2.00s\n")


def test_bodies_are_one_json_document_per_line(tmp_path: Path) -> None:
    path = load.write_bodies(tmp_path / "b.jsonl", [{"inputs": "a\nb"}, {"inputs": ["ü", "x"]}])
    assert path.read_text(encoding="utf-8") == '{"inputs":"a\\nb"}\n{"inputs":["ü","x"]}\n'
    with pytest.raises(ValueError):
        load.write_bodies(tmp_path / "none.jsonl", [])


def test_cpu_is_split_into_tree_api_processes_and_event_loop() -> None:
    before = {1: (False, 1.0, 0.0), 2: (True, 2.0, 1.0)}
    after = {1: (False, 1.5, 0.0), 2: (True, 3.0, 1.6), 3: (True, 0.5, 0.2)}  # 3 started during the run
    cpu = load.cpu_per_request(before, after, requests=1000)
    assert cpu == {"total": pytest.approx(2.0), "api": pytest.approx(1.5), "loop": pytest.approx(0.8)}


def test_command_line_helpers() -> None:
    assert ints("1,64, 256") == [1, 64, 256]
    for bad in ("", "0,1", "a", "1,-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            ints(bad)
    assert settings_env(["max_batch_size=16", "BERTSERVE_VARIANT=int8"]) == {
        "BERTSERVE_MAX_BATCH_SIZE": "16",
        "BERTSERVE_VARIANT": "int8",
    }
    with pytest.raises(argparse.ArgumentTypeError):
        settings_env(["no_value"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (Debian: apt-get install wrk)")
def test_wrk_sends_every_body_in_turn_and_the_servers_cpu_is_measured(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "bench.asgi_reference", "--port", str(port)]
    server = Server("reference", argv, port, tmp_path / "reference.log")
    # the third body is refused (422): status errors at about a third of the requests prove the rotation
    bodies = load.write_bodies(tmp_path / "b.jsonl", [{"inputs": "good"}, {"inputs": ["a", "b"]}, {"inputs": ""}])
    with running(server, ready_timeout=60):
        point = load.measure(server, "/v1/predict", bodies, 1, concurrency=2, duration=1, timeout=5)
    assert point["requests"] > 30 and point["seconds"] == pytest.approx(1, abs=0.3)
    assert point["error_kinds"] == {"status": point["errors"]}
    assert point["requests"] / 4 < point["errors"] < point["requests"] / 2
    assert point["rps"] == pytest.approx((point["requests"] - point["errors"]) / point["seconds"], rel=0.02)
    cpu = point["server_cpu_ms"]
    assert cpu["api"] == cpu["total"]  # one process: it holds the listener
    assert 0 < cpu["loop"] <= cpu["api"] + 20 / point["requests"]  # thread and process clocks differ by a tick or two
    assert point["wrk_cpu_ms"] > 0 and 0 < point["latency_ms"]["p50"] <= point["latency_ms"]["p99"]
