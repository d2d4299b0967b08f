"""``python -m bench.batcher``: the service's Engine driven in-process answers requests and reports them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "bench.batcher", *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_in_process_engine_serves_the_closed_loop(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "batcher.json"
    done = run(
        "--model-dir",
        str(tiny_bundle),
        "-c",
        "8",
        "--inputs-per-request",
        "2",
        "--n-texts",
        "50",
        "--warmup",
        "0.3",
        "--duration",
        "1.5",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(done.stdout)
    assert report["completed"] > 8 and report["inputs_per_s"] == 2 * report["requests_per_s"]
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["mean_batch_size"] > 1  # eight clients at once: the batcher forms real batches
    assert report["variant"] == "fp32" and report["settings"]["max_batch_size"] == 8
    assert "api_key" not in report["settings"]


@pytest.mark.slow
def test_bad_arguments_exit_2(tiny_bundle: Path) -> None:
    done = run("--model-dir", str(tiny_bundle), "-c", "0")
    assert done.returncode == 2 and "concurrency" in done.stderr
