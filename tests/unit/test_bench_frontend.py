"""bench.frontend: the wrk output parser, thread grouping, and one short real run against the tiny bundle.

The smoke test runs the whole tool as a user would (subprocess, real servers, real wrk) for a couple of seconds
per point, so a broken report field, a lost process or a wrong CPU attribution shows up here and not in the
lead's measurement on a quiet machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.frontend import ERROR_KINDS, ProcCPU, parse_wrk, thread_group

ROOT = Path(__file__).resolve().parents[2]

WRK_TEXT = """Running 2s test @ http://127.0.0.1:1/v1/predict
  1 threads and 4 connections
  Latency Distribution
     50%    1.00ms
  1234 requests in 2.00s, 1.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:    617.00
"""


def test_parse_wrk_prefers_the_lua_json_line() -> None:
    line = (
        'WRK_JSON {"requests":10,"bytes":5,"duration_us":2000000,"errors":{"connect":0,"read":0,"write":0,'
        '"status":1,"timeout":0},"latency_us":{"p50":900,"p99":2000}}'
    )
    result = parse_wrk(WRK_TEXT + line + "\n")
    assert result["source"] == "lua"
    assert result["requests"] == 10
    assert result["errors"]["status"] == 1


def test_parse_wrk_falls_back_to_text() -> None:
    result = parse_wrk(WRK_TEXT)
    assert result["source"] == "text"
    assert result["requests"] == 1234
    assert result["duration_us"] == 2_000_000
    assert result["errors"] == {"connect": 0, "read": 2, "write": 0, "timeout": 1, "status": 3}


def test_thread_groups() -> None:
    proc = ProcCPU(pid=10, cmd="python", listener=True, ticks=0, threads={10: ("python", 0), 11: ("python", 0)})
    assert thread_group("python", 10, proc) == "event-loop"
    assert thread_group("python", 11, proc) == "python (unnamed)"
    assert thread_group("ZMQbg/IO/0", 12, proc) == "ZMQbg/IO"
    assert thread_group("onnxruntime-3", 13, proc) == "onnxruntime"
    engine = ProcCPU(pid=20, cmd="python", listener=False, ticks=0, threads={20: ("python", 0)})
    assert thread_group("python", 20, engine) == "main"


@pytest.mark.slow
def test_frontend_smoke(tiny_bundle: Path, tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (Debian: apt-get install wrk); bench.frontend needs it")
    report_path = tmp_path / "frontend.json"
    argv = [
        sys.executable,
        "-m",
        "bench.frontend",
        "--model-dir",
        str(tiny_bundle),
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--concurrency",
        "1,4",
        "--texts",
        "1,8",
        "--api-workers",
        "1",
        "--work-dir",
        str(tmp_path / "work"),
        "--json",
        str(report_path),
    ]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    for key in ("created", "config", "host", "runs", "ratios", "errors_total", "zero_errors", "plot", "notes"):
        assert key in report, key
    assert report["zero_errors"] is True and report["errors_total"] == 0
    assert Path(report["plot"]).stat().st_size > 0
    runs = report["runs"]
    assert {(r["server"], r["texts_per_request"], r["concurrency"]) for r in runs} == {
        (s, n, c) for s in ("reference", "bertserve") for n in (1, 8) for c in (1, 4)
    }
    for r in runs:
        assert r["requests"] > 0 and r["rps"] > 0 and r["ok_requests"] == r["requests"], r
        assert r["inputs_per_s"] == pytest.approx(r["rps"] * r["texts_per_request"], rel=0.01)
        assert set(r["errors"]) == {*ERROR_KINDS, "total"} and r["errors"]["total"] == 0, r["errors"]
        assert {"p50", "p99"} <= set(r["latency_ms"]), r["latency_ms"]
        assert r["wrk"]["source"] == "lua"
        cpu = r["server_cpu"]
        for key in ("total_ms_per_request", "event_loop_ms_per_request", "api_processes_ms_per_request"):
            assert key in cpu, key
        assert cpu["processes"] and cpu["thread_groups_ms_per_request"]
        assert cpu["api_processes"] >= 1
        if r["server"] == "bertserve":
            assert cpu["total_ms_per_request"] > 0, cpu
    ratios = report["ratios"]["vs_reference"]
    assert len(ratios) == 4
    assert all(x["ratio"] is not None and x["ratio"] > 0 for x in ratios), ratios
