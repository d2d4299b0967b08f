"""``python -m bench.run --quick``: the whole comparison end to end on the tiny bundle, JSON and PNG written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_writes_json_and_png(tiny_bundle: Path, tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "bench.run",
        "--model-dir",
        str(tiny_bundle),
        "--quick",
        "--duration",
        "0.5",
        "--out-dir",
        str(tmp_path),
        "--name",
        "quick",
    ]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ceiling best" in done.stdout and "bertserve" in done.stdout
    report = json.loads((tmp_path / "quick.json").read_text())
    assert (tmp_path / "quick.png").stat().st_size > 10_000
    block = report["variants"]["fp32"]
    ceiling = block["ceiling"]
    assert ceiling["best"]["sequences_per_s"] > 0 and ceiling["batch1"]["batch_size"] == 1
    assert {r["order"] for r in ceiling["results"]} == {"arrival", "sorted"}
    assert ceiling["model_dims"]["layers"] == 2
    for name in ("naive", "bertserve"):
        server = block["servers"][name]
        assert server["error"] is None
        runs = {(r["concurrency"], r["inputs_per_request"]) for r in server["runs"]}
        assert runs == {(1, 1), (8, 1), (4, 8)}
        assert all(r["ok"] > 0 and r["error_count"] == 0 for r in server["runs"])
    ratios = block["ratios"]
    assert ratios["ceiling_best_sequences_per_s"] == ceiling["best"]["sequences_per_s"]
    assert len(ratios["targets"]) == 3


@pytest.mark.slow
def test_ceiling_only_run_without_batch_1_reports_and_compares(tiny_bundle: Path, tmp_path: Path) -> None:
    """A run whose --batch-sizes leave out 1 has no batch-1 ceiling: the table, plot and compare still work."""
    argv = [
        sys.executable,
        "-m",
        "bench.run",
        "--model-dir",
        str(tiny_bundle),
        "--only",
        "ceiling",
        "--batch-sizes",
        "2,4",
        "--n-texts",
        "32",
        "--ceiling-max-seconds",
        "0.5",
        "--out-dir",
        str(tmp_path),
        "--name",
        "nob1",
    ]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no batch-1 run" in done.stdout
    ceiling = json.loads((tmp_path / "nob1.json").read_text())["variants"]["fp32"]["ceiling"]
    assert ceiling["batch1"] is None and {r["batch_size"] for r in ceiling["results"]} == {2, 4}
    assert (tmp_path / "nob1.png").stat().st_size > 10_000
    compared = subprocess.run(
        [sys.executable, "-m", "bench.compare", str(tmp_path / "nob1.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert compared.returncode == 0 and "ceiling best seq/s" in compared.stdout, compared.stderr[-2000:]
    assert "batch-1" not in compared.stdout
