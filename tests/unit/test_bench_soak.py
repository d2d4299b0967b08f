"""``python -m bench.soak``, briefly: a real server held at saturation by wrk for two intervals, then drained."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (Debian: apt-get install wrk)")
def test_soak_reports_each_interval_and_the_drain(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = [sys.executable, "-m", "bench.soak", "--model-dir", str(tiny_bundle), "--duration", "2", "--interval", "1"]
    argv += ["-c", "4", "--n-texts", "50", "--set", "max_queue=64", "--json", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["settings"] == {"BERTSERVE_MAX_QUEUE": "64"}
    assert len(summary["intervals"]) == 2 and all(row["rps"] > 0 for row in summary["intervals"])
    assert summary["answers"] == {"5xx": 0, "429": 0} and summary["transport_errors"] == 0
    assert 0 < summary["rss_mib"]["start"] <= summary["rss_mib"]["peak"]
    assert summary["intervals"][0]["server_cores"] > 0 and summary["intervals"][0]["queue_depth"] is not None
    assert summary["shutdown"] == {"died": False, "exit_status": 0, "drain_s": summary["shutdown"]["drain_s"]}
