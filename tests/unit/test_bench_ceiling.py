"""The in-process ceiling measures the service's thread layouts, runs workers at once, and reports each."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not an installed package

from bench import ceiling
from bench.ceiling import Layout


def test_layouts_follow_the_service_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BERTSERVE_INFERENCE_WORKERS", "3")
    monkeypatch.setenv("BERTSERVE_INTRA_OP_THREADS", "2")
    assert ceiling.service_layouts() == [Layout(1, 6), Layout(3, 2)]
    monkeypatch.setenv("BERTSERVE_SOLO_THREADS", "1")  # no solo session: a lone batch runs on one worker's
    assert ceiling.service_layouts() == [Layout(1, 2), Layout(3, 2)]
    monkeypatch.setenv("BERTSERVE_INFERENCE_WORKERS", "1")
    assert ceiling.service_layouts() == [Layout(1, 2)]
    assert ceiling.service_layouts(intra_op_threads=4) == [Layout(1, 4)]


@pytest.mark.parametrize("text", ["2x0", "0x1", "2", "axb"])
def test_bad_layouts_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Layout.parse(text)


def test_drive_runs_the_workers_at_once_and_every_group_once() -> None:
    groups = [[i] for i in range(12)]
    seen: list[int] = []
    inside = 0
    most_inside = 0
    lock = threading.Lock()

    def runner(n: int) -> None:
        nonlocal inside, most_inside
        with lock:
            inside += 1
            most_inside = max(most_inside, inside)
            seen.append(n)
        time.sleep(0.01)
        with lock:
            inside -= 1

    done, latencies, seconds = ceiling._drive(groups, [runner, runner, runner], max_seconds=60)
    assert sorted(seen) == list(range(12)) and sorted(g[0] for g in done) == list(range(12))
    assert most_inside == 3 and len(latencies) == 12
    assert seconds < 12 * 0.01  # three at a time, not one after another


def test_drive_stops_taking_groups_after_max_seconds() -> None:
    groups = [[i] for i in range(1000)]
    done, _, _ = ceiling._drive(groups, [lambda n: time.sleep(0.005)], max_seconds=0.05)
    assert 1 <= len(done) < 100


def test_ceiling_reports_every_layout(tiny_bundle: Path) -> None:
    texts = ["a short text", "another somewhat longer text about the news of the day"] * 8
    report = ceiling.run_ceiling(
        tiny_bundle,
        "fp32",
        texts,
        batch_sizes=[1, 4],
        tokenize_modes=(True,),
        max_seconds=5,
        layouts=[Layout(1, 2), Layout(2, 1)],
    )
    assert report["layouts"] == ["1x2", "2x1"]
    runs = {(r["workers"], r["threads"], r["batch_size"], r["order"]) for r in report["results"]}
    assert runs == {
        (w, t, b, o) for w, t in ((1, 2), (2, 1)) for b, o in ((1, "arrival"), (4, "arrival"), (4, "sorted"))
    }
    assert all(r["sequences"] == len(texts) for r in report["results"])
    best = max(report["results"], key=lambda r: r["sequences_per_s"])
    assert report["best"] == best
    assert (report["batch1"]["workers"], report["batch1"]["threads"], report["batch1"]["batch_size"]) == (1, 2, 1)
