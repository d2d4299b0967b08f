"""``python -m bench.run --quick``: the demo benchmark end to end on the tiny bundle: ceiling, naive server and
bertserve driven by wrk with the workload's texts, the summary written and its table printed."""

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
def test_quick_run_writes_the_summary_and_prints_its_table(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    argv = [sys.executable, "-m", "bench.run", "--model-dir", str(tiny_bundle), "--quick", "--json", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert tables.demo_table(summary) in done.stdout
    block = summary["variants"]["fp32"]
    assert block["errors"] == []
    ceiling = block["ceiling"]
    assert ceiling["best"]["sequences_per_s"] > 0 and ceiling["batch1"]["batch_size"] == 1
    points = {(p["server"], p["concurrency"], p["inputs_per_request"]): p for p in block["points"]}
    assert set(points) == {(s, c, n) for s in ("naive", "bertserve") for c, n in ((1, 1), (8, 1), (4, 8))}
    for p in points.values():
        assert p["requests"] > 0 and p["errors"] == 0, p
        assert p["vs_ceiling"] == pytest.approx(p["inputs_per_s"] / ceiling["best"]["sequences_per_s"], rel=1e-3)
        assert p["server_cpu_ms"]["total"] > 0
    assert points[("bertserve", 8, 1)]["mean_batch_size"] >= 1  # read from bertserve's /metrics
    assert points[("naive", 8, 1)]["mean_batch_size"] is None  # the naive server has no /metrics
    assert points[("bertserve", 8, 1)]["p99_vs_naive"] > 0
    assert summary["workload"]["tokens"]["n"] == 64
