"""service.monitoring: prediction counters, the confidence histogram, PSI drift against a reference, in single-
and multi-process prometheus_client modes. Real registries and real expositions throughout."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

import service.monitoring as monitoring_module
from service.monitoring import CONFIDENCE_BUCKETS, MIN_ROWS, NO_REFERENCE_WARNING, PredictionMonitor, psi

REPO = Path(__file__).resolve().parents[2]
LABELS = ("business", "entertainment", "politics", "sport", "tech")
SHARES = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
EDGES = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]


@dataclass
class Ref:
    """Structurally what service.bundle's Reference is: the manifest's test-split distributions."""

    n: int
    labels: dict[str, float]
    confidence_edges: list[float] = field(default_factory=lambda: list(EDGES))
    confidence: list[float] = field(default_factory=list)


def split_like(rng: np.random.Generator, n: int, shares: np.ndarray = SHARES) -> tuple[np.ndarray, list[list[int]]]:
    """`n` softmax-like rows: label drawn from `shares`, top score from a beta skewed towards 1."""
    predicted = rng.choice(len(LABELS), size=n, p=shares)
    top = 0.5 + 0.5 * rng.beta(5, 1.5, size=n)
    rest = rng.dirichlet(np.ones(len(LABELS) - 1), size=n) * (1 - top)[:, None]
    scores = np.empty((n, len(LABELS)), dtype=np.float32)
    for i, label in enumerate(predicted):
        scores[i] = np.insert(rest[i], label, top[i])
    return scores, [[int(label)] for label in predicted]


def reference_of(scores: np.ndarray, predicted: list[list[int]]) -> Ref:
    """What training stores: shares of predicted labels and of top scores per confidence bin, on its test split."""
    counts = np.bincount([p[0] for p in predicted], minlength=len(LABELS))
    hist, _ = np.histogram(scores.max(axis=1), bins=EDGES)
    return Ref(
        n=len(predicted),
        labels={name: float(c) / len(predicted) for name, c in zip(LABELS, counts, strict=True)},
        confidence=[float(h) / len(predicted) for h in hist],
    )


def feed(monitor: PredictionMonitor, scores: np.ndarray, predicted: list[list[int]], batch: int = 8) -> None:
    for i in range(0, len(predicted), batch):
        monitor.observe(scores[i : i + batch], predicted[i : i + batch])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def reference(rng: np.random.Generator) -> Ref:
    return reference_of(*split_like(rng, 20_000))


# ----------------------------------------------------------------------------------------------------------------
# psi


def test_psi_matches_a_hand_computed_value() -> None:
    # (0.9 - 0.5) ln(0.9 / 0.5) + (0.1 - 0.5) ln(0.1 / 0.5)
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * math.log(1.8) + 0.4 * math.log(5), rel=1e-12)
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.878890, abs=1e-6)
    # Counts are normalised like shares: the same distributions give the same PSI.
    assert psi([50, 50], [90, 10]) == pytest.approx(psi([0.5, 0.5], [0.9, 0.1]))


def test_psi_floors_empty_bins_at_epsilon() -> None:
    # Third bin empty in the reference: expected share 1e-4 instead of 0 (infinite PSI otherwise).
    by_hand = (0.4 - 0.5) * math.log(0.4 / 0.5) + (0.1 - 1e-4) * math.log(0.1 / 1e-4)
    assert psi([0.5, 0.5, 0.0], [0.5, 0.4, 0.1]) == pytest.approx(by_hand, rel=1e-12)
    assert psi([0.5, 0.5, 0.0], [0.5, 0.4, 0.1]) == pytest.approx(0.712399, abs=1e-6)
    assert psi([1, 2, 3], [1, 2, 3]) == 0.0


def test_psi_of_nothing_is_nan_and_shapes_must_agree() -> None:
    assert math.isnan(psi([0, 0], [1, 2]))
    assert math.isnan(psi([1, 2], [0, 0]))
    with pytest.raises(ValueError, match="shape"):
        psi([1, 2], [1, 2, 3])


# ----------------------------------------------------------------------------------------------------------------
# counters and histogram


def test_predictions_low_margin_and_confidence_are_counted() -> None:
    registry = CollectorRegistry()
    monitor = PredictionMonitor(registry, "bbc", LABELS, None, low_margin=0.1)
    scores = np.array(
        [
            [0.90, 0.05, 0.03, 0.01, 0.01],  # business, confident
            [0.45, 0.40, 0.05, 0.05, 0.05],  # business, margin 0.05: low
            [0.05, 0.05, 0.05, 0.75, 0.10],  # sport
        ],
        dtype=np.float32,
    )
    monitor.observe(scores, [[0], [0], [3]])

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model": "bbc", **labels})

    assert value("bertserve_predictions_total", label="business") == 2
    assert value("bertserve_predictions_total", label="sport") == 1
    assert value("bertserve_predictions_total", label="tech") == 0  # every label's series exists from the start
    assert value("bertserve_low_margin_predictions_total") == 1
    assert value("bertserve_prediction_confidence_count") == 3
    assert value("bertserve_prediction_confidence_sum") == pytest.approx(0.90 + 0.45 + 0.75, abs=1e-6)
    assert value("bertserve_prediction_confidence_bucket", le="0.5") == 1
    assert value("bertserve_prediction_confidence_bucket", le="0.8") == 2
    assert value("bertserve_prediction_confidence_bucket", le="0.9") == 3


def test_multi_label_rows_count_every_label_and_rows_without_one() -> None:
    registry = CollectorRegistry()
    monitor = PredictionMonitor(registry, "tags", ("a", "b", "c"), Ref(n=10, labels={"a": 1, "b": 1, "c": 1}))
    scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.1, 0.3], [0.7, 0.6, 0.9]], dtype=np.float32)
    monitor.observe(scores, [[0, 1], [], [0, 1, 2]])
    got = {
        lab: registry.get_sample_value("bertserve_predictions_total", {"model": "tags", "label": lab}) for lab in "abc"
    }
    assert got == {"a": 2, "b": 2, "c": 1}
    assert registry.get_sample_value("bertserve_prediction_confidence_count", {"model": "tags"}) == 3


def test_batched_histogram_agrees_with_observe_row_by_row(rng: np.random.Generator) -> None:
    """The vectorised bucket update must put every value, bucket bounds included, where Histogram.observe does."""
    registry = CollectorRegistry()
    monitor = PredictionMonitor(registry, "m", ("x", "y"), None)
    control = Histogram("control", "row by row", buckets=CONFIDENCE_BUCKETS, registry=CollectorRegistry())
    tops = np.concatenate([np.array(CONFIDENCE_BUCKETS, dtype=np.float32), rng.uniform(0.5, 1.0, 200)])
    tops = tops.astype(np.float32)
    for batch in np.array_split(tops, 25):  # sizes 8 and 9: the vectorised path
        scores = np.stack([batch, np.zeros_like(batch)], axis=1)  # the top score is the value itself
        monitor.observe(scores, [[0]] * len(batch))
        for value in batch.tolist():
            control.observe(value)
    monitor.observe(np.array([[0.55, 0.45]], dtype=np.float32), [[0]])  # one row: the per-row path
    control.observe(float(np.float32(0.55)))
    want = {(s.name, s.labels.get("le")): s.value for s in control.collect()[0].samples}
    got = {
        (s.name.replace("bertserve_prediction_confidence", "control"), s.labels.get("le")): s.value
        for family in registry.collect()
        if family.name == "bertserve_prediction_confidence"
        for s in family.samples
        if not s.name.endswith("_created")
    }
    want = {k: v for k, v in want.items() if not k[0].endswith("_created")}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


# ----------------------------------------------------------------------------------------------------------------
# drift


def drift_samples(registry: CollectorRegistry, model: str) -> tuple[float | None, float | None]:
    return (
        registry.get_sample_value("bertserve_label_drift_psi", {"model": model}),
        registry.get_sample_value("bertserve_confidence_drift_psi", {"model": model}),
    )


def test_one_label_stream_raises_label_psi_past_the_alert_and_split_shaped_traffic_brings_it_back(
    rng: np.random.Generator, reference: Ref
) -> None:
    registry = CollectorRegistry()
    monitor = PredictionMonitor(registry, "bbc", LABELS, reference, window=2000)
    feed(monitor, *split_like(rng, 2000))
    label_psi, confidence_psi = drift_samples(registry, "bbc")
    assert label_psi is not None and confidence_psi is not None
    assert label_psi < 0.02 and confidence_psi < 0.02, (label_psi, confidence_psi)

    only_sport = np.array([0.0, 0.0, 0.0, 1.0, 0.0])
    feed(monitor, *split_like(rng, 2000, only_sport))
    label_psi, confidence_psi = drift_samples(registry, "bbc")
    assert label_psi is not None and label_psi > 0.2, label_psi
    assert confidence_psi is not None and confidence_psi < 0.02  # scores still shaped like the split

    feed(monitor, *split_like(rng, 2000))
    label_psi, _ = drift_samples(registry, "bbc")
    assert label_psi is not None and label_psi < 0.02, label_psi


def test_unsure_traffic_raises_confidence_psi(rng: np.random.Generator, reference: Ref) -> None:
    registry = CollectorRegistry()
    monitor = PredictionMonitor(registry, "bbc", LABELS, reference, window=500)
    scores, predicted = split_like(rng, 500)
    scores = np.full_like(scores, 0.2)  # the model cannot tell the labels apart any more
    scores[np.arange(500), [p[0] for p in predicted]] = 0.24
    feed(monitor, scores, predicted)
    label_psi, confidence_psi = drift_samples(registry, "bbc")
    assert label_psi is not None and label_psi < 0.05
    assert confidence_psi is not None and confidence_psi > 0.2


def test_window_keeps_exactly_the_last_rows_across_wrap_around(rng: np.random.Generator, reference: Ref) -> None:
    """Batches of uneven sizes, some larger than the window: the PSI equals one computed from the last rows."""
    window = 150
    monitor = PredictionMonitor(CollectorRegistry(), "m", LABELS, reference, window=window)
    rows: list[tuple[float, int]] = []
    for size in [7, 64, 1, 33, 200, 5, 149, 151, 9, 80]:
        shares = rng.dirichlet(np.ones(len(LABELS)))
        scores, predicted = split_like(rng, size, shares)
        monitor.observe(scores, predicted)
        rows += [(float(s.max()), p[0]) for s, p in zip(scores, predicted, strict=True)]
        last = rows[-window:]
        want_labels = psi(list(reference.labels.values()), np.bincount([r[1] for r in last], minlength=len(LABELS)))
        tops = np.clip([r[0] for r in last], EDGES[0], EDGES[-1])
        want_conf = psi(reference.confidence, np.histogram(tops, bins=EDGES)[0])
        if len(rows) >= min(MIN_ROWS, window):
            assert monitor.drift() == pytest.approx((want_labels, want_conf), rel=1e-9)


def test_drift_is_nan_until_the_window_has_enough_rows(rng: np.random.Generator, reference: Ref) -> None:
    registry = CollectorRegistry()
    monitor = PredictionMonitor(registry, "m", LABELS, reference)
    label_psi, _ = drift_samples(registry, "m")
    assert label_psi is not None and math.isnan(label_psi)  # the series exists (panels, alerts see the model)
    feed(monitor, *split_like(rng, MIN_ROWS - 1))
    assert math.isnan(monitor.drift()[0])
    feed(monitor, *split_like(rng, 1))
    assert not math.isnan(monitor.drift()[0])


def test_without_reference_no_drift_series_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    with caplog.at_level(logging.WARNING, logger="service.monitoring"):
        monitor = PredictionMonitor(registry, "m", LABELS, None)
    assert [r.getMessage() for r in caplog.records] == [NO_REFERENCE_WARNING]
    monitor.observe(np.full((2, 5), 0.2, dtype=np.float32), [[0], [1]])
    text = generate_latest(registry).decode()
    assert "bertserve_predictions_total" in text
    assert "bertserve_label_drift_psi{" not in text and "bertserve_confidence_drift_psi{" not in text
    assert not monitor.drift_enabled


@pytest.mark.parametrize(
    "bad",
    [
        Ref(n=1, labels={"nope": 1.0}, confidence=[1] * 7),
        Ref(n=1, labels={"sport": 1.0}, confidence=[1, 2]),
        Ref(n=1, labels={"sport": 1.0}, confidence_edges=[0, 1, 0.5], confidence=[1, 1]),
        Ref(n=1, labels={"sport": 0.0}, confidence=[1] * 7),
    ],
)
def test_an_unusable_reference_turns_drift_off_with_the_reason(bad: Ref, caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    with caplog.at_level(logging.WARNING, logger="service.monitoring"):
        monitor = PredictionMonitor(registry, "m", LABELS, bad)
    assert not monitor.drift_enabled
    assert NO_REFERENCE_WARNING in caplog.text
    assert drift_samples(registry, "m") == (None, None)


def test_models_share_a_registry_and_a_reload_replaces_its_predecessor(
    rng: np.random.Generator, reference: Ref
) -> None:
    registry = CollectorRegistry()
    a = PredictionMonitor(registry, "a", LABELS, reference)
    b = PredictionMonitor(registry, "b", LABELS, reference)
    feed(a, *split_like(rng, 200))
    feed(b, *split_like(rng, 200, np.array([1.0, 0, 0, 0, 0])))
    assert drift_samples(registry, "a")[0] < 0.2 < drift_samples(registry, "b")[0]  # type: ignore[operator]
    b2 = PredictionMonitor(registry, "b", LABELS, reference)  # reloaded: a fresh window, counters carry on
    assert math.isnan(drift_samples(registry, "b")[0])  # type: ignore[arg-type]
    assert registry.get_sample_value("bertserve_predictions_total", {"model": "b", "label": "business"}) == 200
    b2.close()
    assert drift_samples(registry, "b") == (None, None)
    assert drift_samples(registry, "a")[0] is not None


def test_labels_and_window_must_be_sane() -> None:
    with pytest.raises(ValueError):
        PredictionMonitor(CollectorRegistry(), "m", (), None)
    with pytest.raises(ValueError):
        PredictionMonitor(CollectorRegistry(), "m", LABELS, None, window=0)


# ----------------------------------------------------------------------------------------------------------------
# multi-process mode

MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from prometheus_client import CollectorRegistry, multiprocess
    sys.path.insert(0, sys.argv[1])
    from service import monitoring
    from tests.unit.test_monitoring import LABELS, reference_of, split_like, feed

    rng = np.random.default_rng(7)
    assert monitoring.multiprocess_mode()
    monitor = monitoring.PredictionMonitor(None, "bbc", LABELS, reference_of(*split_like(rng, 5000)), window=500)
    plain = monitoring.PredictionMonitor(None, "plain", LABELS, None)  # same default registry: shared families

    def scrape():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # what the scraping (API) process does
        get = lambda name, **labels: registry.get_sample_value(name, labels)
        return {
            "label_psi": get("bertserve_label_drift_psi", model="bbc"),
            "confidence_psi": get("bertserve_confidence_drift_psi", model="bbc"),
            "plain_psi": get("bertserve_label_drift_psi", model="plain"),
            "sport": get("bertserve_predictions_total", model="bbc", label="sport"),
            "count": get("bertserve_prediction_confidence_count", model="bbc"),
        }

    out = {"start": scrape()}
    feed(monitor, *split_like(rng, 500))
    monitor.refresh()
    out["split"] = scrape()
    feed(monitor, *split_like(rng, 500, np.array([0, 0, 0, 1.0, 0])))
    out["throttled"] = scrape()  # within a second of the last refresh: not recomputed yet
    monitor.refresh()
    out["sport_only"] = scrape()
    print(json.dumps(out))
    """
)


def test_multiprocess_mode_exports_counters_and_psi_gauges_through_the_mmap_files(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_SCRIPT, str(REPO)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert math.isnan(out["start"]["label_psi"]) and out["start"]["plain_psi"] is None
    assert out["split"]["label_psi"] < 0.1 and out["split"]["confidence_psi"] < 0.1
    assert out["throttled"]["label_psi"] == out["split"]["label_psi"]
    assert out["sport_only"]["label_psi"] > 0.2
    assert out["sport_only"]["count"] == 1000
    assert out["sport_only"]["sport"] > 500
    assert list(tmp_path.glob("gauge_mostrecent_*.db")), list(tmp_path.iterdir())


def test_time_window_forgets_rows_older_than_window_s(
    rng: np.random.Generator, reference: Ref, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With window_s, PSI covers only the recent rows: an old one-label burst stops counting once it is stale."""
    clock = [1000.0]
    monkeypatch.setattr(monitoring_module.time, "monotonic", lambda: clock[0])
    timed = PredictionMonitor(CollectorRegistry(), "t", LABELS, reference, window=5000, window_s=60)
    sized = PredictionMonitor(CollectorRegistry(), "s", LABELS, reference, window=5000)
    burst = split_like(rng, 1000, np.eye(len(LABELS))[0])  # every prediction is label 0
    for monitor in (timed, sized):
        feed(monitor, *burst)
    assert timed.drift()[0] > 0.2 and sized.drift()[0] > 0.2
    clock[0] += 120  # the burst is two minutes old; normal traffic since
    normal = split_like(rng, 1000)
    for monitor in (timed, sized):
        feed(monitor, *normal)
    assert timed.drift()[0] < 0.05  # only the last minute: shaped like the split
    assert sized.drift()[0] > 0.2  # by count, the burst is still half the window
    clock[0] += 120  # nothing in the last minute: too few rows for a PSI
    assert math.isnan(timed.drift()[0])
    with pytest.raises(ValueError, match="window_s"):
        PredictionMonitor(CollectorRegistry(), "x", LABELS, reference, window_s=-1)
