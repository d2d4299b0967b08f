"""bench.frontend: which servers a run measures, how ratios pair up, and one short real run of the whole tool.

The smoke test runs the tool as a user would (subprocess, real servers, real wrk) for a second per point, with a
baseline bertserve beside the measured one (a same-run A/B), so a broken summary field, a lost process or a wrong
pairing shows up here and not in a measurement on a quiet machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import frontend, tables

ROOT = Path(__file__).resolve().parents[2]


def test_plan_adds_a_baseline_only_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BERTSERVE_MAX_QUEUE", raising=False)
    cfg = frontend.Config(concurrency=[1, 256], texts=[1, 8], api_workers=[1, 2], server_set=["access_log=true"])
    names = [(t.name, t.workers) for t in frontend.plan(cfg)]
    assert names == [("reference", 1), ("bertserve", 1), ("bertserve", 2)]
    ours = frontend.plan(cfg)[1].env
    assert ours == {"BERTSERVE_MAX_QUEUE": "4096", "BERTSERVE_ACCESS_LOG": "true"}  # 2 x 256 clients x 8 texts
    cfg.baseline_root = tmp_path
    baseline = frontend.plan(cfg)[-1]
    assert (baseline.name, baseline.root, baseline.env) == ("baseline", tmp_path, {"BERTSERVE_MAX_QUEUE": "4096"})


def point(server: str, rps: float, round_: int) -> dict:
    """A summary point with the fields the ratios and tables read."""
    return {
        "server": server,
        "workers": 1,
        "round": round_,
        "inputs_per_request": 1,
        "concurrency": 64,
        "rps": rps,
        "inputs_per_s": rps,
        "latency_ms": {"p50": 1.0, "p99": 2.0},
        "server_cpu_ms": {"total": 0.3, "api": 0.2, "loop": 0.1},
        "errors": 0,
    }


def test_ratios_pair_points_of_the_same_round() -> None:
    points = [point("reference", 1000, 0), point("bertserve", 200, 0), point("baseline", 100, 0)]
    points += [point("baseline", 300, 1), point("bertserve", 150, 1), point("reference", 500, 1)]
    frontend.add_ratios(points, reference_workers=1)
    ours = [(p["round"], p["vs_reference"], p["vs_baseline"]) for p in points if p["server"] == "bertserve"]
    assert ours == [(0, 0.2, 2.0), (1, 0.3, 0.5)]
    assert [(p["vs_reference"], p["vs_baseline"]) for p in points if p["server"] == "baseline"] == [
        (0.1, None),
        (0.6, None),
    ]
    assert all(p["vs_reference"] is None for p in points if p["server"] == "reference")
    row = next(r for r in tables.frontend_rows({"points": points}) if r["server"] == "bertserve")
    assert (row["vs_reference"], row["vs_baseline"]) == (pytest.approx(0.25), pytest.approx(1.25))  # medians


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (Debian: apt-get install wrk)")
def test_frontend_smoke_with_a_same_run_baseline(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "frontend.json"
    argv = [sys.executable, "-m", "bench.frontend", "--model-dir", str(tiny_bundle), "--duration", "1"]
    argv += ["--warmup", "0", "--concurrency", "4", "--texts", "1,8", "--api-workers", "1"]
    argv += ["--baseline-set", "monitoring=false", "--work-dir", str(tmp_path / "work"), "--json", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(out.read_text())
    assert summary["errors_total"] == 0
    assert summary["servers"]["baseline"]["env"]["BERTSERVE_MONITORING"] == "false"
    assert {(p["server"], p["inputs_per_request"]) for p in summary["points"]} == {
        (s, n) for s in ("reference", "bertserve", "baseline") for n in (1, 8)
    }
    for p in summary["points"]:
        assert p["requests"] > 0 and p["errors"] == 0, p
        assert p["inputs_per_s"] == pytest.approx(p["rps"] * p["inputs_per_request"], rel=0.01)
        cpu, tick = p["server_cpu_ms"], 20 / p["requests"]  # thread and process clocks differ by a tick or two
        assert 0 < cpu["loop"] <= cpu["api"] + tick and cpu["api"] <= cpu["total"] + tick, p
        if p["server"] != "reference":
            assert p["vs_reference"] > 0 and (p["vs_baseline"] is not None) == (p["server"] == "bertserve"), p
    assert tables.frontend_table(summary) in done.stdout
