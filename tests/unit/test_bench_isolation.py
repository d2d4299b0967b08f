"""bench.isolation end to end, briefly: a real repository server, wrk saturating one model, httpx probing the other."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import tables

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (Debian: apt-get install wrk)")
def test_isolation_reports_solo_and_saturated_p99_for_the_neighbour(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "isolation.json"
    argv = [sys.executable, "-m", "bench.isolation", "--model-dir", str(tiny_bundle), "--concurrency", "4"]
    done = subprocess.run(
        [*argv, "--probes", "20", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (run,) = json.loads(out.read_text())["runs"]
    assert run["concurrency"] == 4
    assert run["solo"]["p99_ms"] > 0 and run["saturated"]["p99_ms"] > 0
    assert run["p99_ratio"] == pytest.approx(run["saturated"]["p99_ms"] / run["solo"]["p99_ms"], rel=1e-2)
    assert run["alpha_requests_per_s"] > 0  # wrk really loaded alpha
    assert run["alpha_errors"] == 0
    assert tables.isolation_table(json.loads(out.read_text())) in done.stdout
