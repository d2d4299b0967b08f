"""What the model predicts, and whether that still looks like the test split it was evaluated on.

Per model, one `PredictionMonitor` fed once per inference batch (in the engine process) maintains:

- `bertserve_predictions_total{model,label}`: predicted labels (every label of a multi-label row counts);
- `bertserve_prediction_confidence{model}`: histogram of the top score of each row;
- `bertserve_low_margin_predictions_total{model}`: rows whose top-1 minus top-2 score is below `low_margin`
  (the model hesitated between two labels);
- `bertserve_label_drift_psi{model}` and `bertserve_confidence_drift_psi{model}`: the population stability index
  (PSI) of the last `window` rows (and, with `window_s`, only those of the last `window_s` seconds) against the
  reference distributions the bundle's manifest carries.

Why this shape:

- The hot path only appends: one numpy write into a ring buffer per batch, and a handful of counter increments per
  batch (not per row). PSI needs the whole window, so it is computed when Prometheus scrapes (a custom collector)
  and costs nothing between scrapes.
- prometheus_client's multi-process mode (PROMETHEUS_MULTIPROC_DIR set) cannot run code at scrape time in the
  process that owns the data: values travel through mmap files. There the PSI gauges are plain gauges
  (`multiprocess_mode="mostrecent"`: one writer, and the live engine's writes are always the most recent, so a
  dead engine's file never wins) recomputed inside `observe` at most once per `MULTIPROCESS_REFRESH_S`.
- Several models can share one registry: the metric families are created once per registry and shared, each
  monitor owns its `model` label value.

PSI = sum_i (a_i - e_i) * ln(a_i / e_i) over bins, with expected (reference) and actual (window) proportions
floored at `PSI_EPSILON` = 1e-4 so an empty bin costs a bounded, large-ish term instead of infinity. The usual
reading: < 0.1 stable, 0.1-0.2 moderate shift, > 0.2 a shift worth acting on (the alert threshold).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: Floor for empty bins in `psi`, on both sides: ln(0.1 / 1e-4) ~ 6.9 bounds one empty bin's term.
PSI_EPSILON = 1e-4
#: Top-score histogram buckets: fine near 1, where a calibrated classifier's confident predictions pile up.
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
#: Multi-process mode only: how often `observe` recomputes the PSI gauges (seconds, at most).
MULTIPROCESS_REFRESH_S = 1.0
#: PSI is reported as NaN until the window holds this many rows (or is full, if smaller): a PSI over a handful of
#: predictions is sampling noise, and NaN never satisfies `> 0.2`, so a quiet service does not page anyone.
MIN_ROWS = 100

NO_REFERENCE_WARNING = "bundle has no reference distributions; drift metrics off"


class Reference(Protocol):
    """The manifest's reference distributions (service/bundle.py's `Reference` model satisfies this).

    `labels`: label name -> share (or count) of predicted labels on the test split; `confidence_edges`: bin edges
    of the top score (k + 1 increasing values, usually 0 .. 1); `confidence`: share (or count) per bin (k values).
    Shares need not sum to 1: both sides are normalised before the PSI.
    """

    @property
    def n(self) -> int: ...
    @property
    def labels(self) -> Mapping[str, float]: ...
    @property
    def confidence_edges(self) -> Sequence[float]: ...
    @property
    def confidence(self) -> Sequence[float]: ...


FloatArray = npt.NDArray[np.float64]


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, eps: float = PSI_EPSILON) -> float:
    """Population stability index of `actual` against `expected`: sum (a - e) * ln(a / e) over bins.

    Both arguments are per-bin counts or proportions (normalised here); proportions below `eps` are raised to
    `eps`. NaN when either side is empty.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape:
        raise ValueError(f"psi: expected has shape {e.shape}, actual {a.shape}")
    e_total, a_total = float(e.sum()), float(a.sum())
    if e_total <= 0 or a_total <= 0:
        return math.nan
    e = np.maximum(e / e_total, eps)
    a = np.maximum(a / a_total, eps)
    return float(np.sum((a - e) * np.log(a / e)))


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes values to mmap files (decided, as the library does, by the env var)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))  # noqa: SIM112


@dataclass(frozen=True)
class _Expected:
    """A reference, checked and turned into arrays aligned with the model's label order."""

    labels: FloatArray
    edges: FloatArray
    confidence: FloatArray

    @classmethod
    def build(cls, reference: Reference, labels: Sequence[str]) -> _Expected:
        unknown = sorted(set(reference.labels) - set(labels))
        if unknown:
            raise ValueError(f"reference names labels the model does not have: {unknown}")
        label_shares = np.array([float(reference.labels.get(name, 0.0)) for name in labels], dtype=np.float64)
        edges = np.asarray(reference.confidence_edges, dtype=np.float64)
        confidence = np.asarray(reference.confidence, dtype=np.float64)
        if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
            raise ValueError("reference confidence_edges must be at least two increasing values")
        if confidence.shape != (len(edges) - 1,):
            raise ValueError(f"reference has {len(confidence)} confidence bins for {len(edges) - 1} edge intervals")
        for name, values in (("labels", label_shares), ("confidence", confidence)):
            if np.any(values < 0) or not np.isfinite(values).all() or values.sum() <= 0:
                raise ValueError(f"reference {name} must be finite, non-negative and not all zero")
        return cls(labels=label_shares, edges=edges, confidence=confidence)


class _DriftCollector(Collector):
    """Single-process mode: computes every registered monitor's PSI when the registry is collected (scraped)."""

    def __init__(self) -> None:
        self.monitors: dict[str, PredictionMonitor] = {}
        self._lock = threading.Lock()

    def add(self, monitor: PredictionMonitor) -> None:
        with self._lock:
            self.monitors[monitor.model] = monitor  # a reloaded model replaces its predecessor

    def discard(self, monitor: PredictionMonitor) -> None:
        with self._lock:
            if self.monitors.get(monitor.model) is monitor:
                del self.monitors[monitor.model]

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        label_family, confidence_family = self._families()
        with self._lock:
            monitors = list(self.monitors.values())
        for monitor in monitors:
            label_psi, confidence_psi = monitor.drift()
            label_family.add_metric([monitor.model], label_psi)
            confidence_family.add_metric([monitor.model], confidence_psi)
        return [label_family, confidence_family]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("bertserve_label_drift_psi", LABEL_PSI_HELP, labels=["model"]),
            GaugeMetricFamily("bertserve_confidence_drift_psi", CONFIDENCE_PSI_HELP, labels=["model"]),
        ]


LABEL_PSI_HELP = (
    "Population stability index of the predicted-label distribution over the recent window vs the bundle's "
    "test split; NaN until the window has enough rows."
)
CONFIDENCE_PSI_HELP = (
    "Population stability index of the top-score distribution over the recent window vs the bundle's "
    "test split; NaN until the window has enough rows."
)


@dataclass
class _Families:
    """The collectors of one registry, shared by every model's monitor."""

    predictions: Counter
    confidence: Histogram
    low_margin: Counter
    drift: _DriftCollector | None  # single-process mode
    label_psi: Gauge | None  # multi-process mode
    confidence_psi: Gauge | None


_families_lock = threading.Lock()
_families: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()


def _families_for(registry: CollectorRegistry) -> _Families:
    with _families_lock:
        found = _families.get(registry)
        if found is not None:
            return found
        predictions = Counter(
            "bertserve_predictions",
            "Predicted labels, by model and label (each label of a multi-label row counts).",
            ["model", "label"],
            registry=registry,
        )
        confidence = Histogram(
            "bertserve_prediction_confidence",
            "Top score (calibrated probability) of each prediction.",
            ["model"],
            buckets=CONFIDENCE_BUCKETS,
            registry=registry,
        )
        low_margin = Counter(
            "bertserve_low_margin_predictions",
            "Predictions whose top-1 minus top-2 score was below the low-margin setting.",
            ["model"],
            registry=registry,
        )
        drift: _DriftCollector | None = None
        label_psi = confidence_psi = None
        if multiprocess_mode():
            label_psi = Gauge(
                "bertserve_label_drift_psi",
                LABEL_PSI_HELP,
                ["model"],
                registry=registry,
                multiprocess_mode="mostrecent",
            )
            confidence_psi = Gauge(
                "bertserve_confidence_drift_psi",
                CONFIDENCE_PSI_HELP,
                ["model"],
                registry=registry,
                multiprocess_mode="mostrecent",
            )
        else:
            drift = _DriftCollector()
            registry.register(drift)
        found = _Families(predictions, confidence, low_margin, drift, label_psi, confidence_psi)
        _families[registry] = found
        return found


class PredictionMonitor:
    """Prediction metrics and drift of one model; `observe` once per inference batch.

    Thread-safe: `observe` may run in the inference thread while a scrape computes the drift in another.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None,
        model: str,
        labels: Sequence[str],
        reference: Reference | None,
        window: int = 2000,
        low_margin: float = 0.1,
        window_s: float = 0.0,
    ) -> None:
        """``window``: rows kept (the size window). ``window_s`` > 0 adds a time window: PSI over the kept rows
        of the last ``window_s`` seconds only, so a quiet hour's few predictions are not diluted by yesterday's
        (the size bounds the memory either way)."""
        if window < 1:
            raise ValueError("window must be at least 1")
        if window_s < 0:
            raise ValueError("window_s must be >= 0 (0: size window only)")
        if not labels:
            raise ValueError("a model has at least one label")
        self.model = model
        self.labels = tuple(labels)
        self.window = window
        self.window_s = float(window_s)
        self.low_margin = float(low_margin)
        self._families = _families_for(REGISTRY if registry is None else registry)
        f = self._families
        self._label_counters = [f.predictions.labels(model, name) for name in self.labels]  # series exist at 0
        self._confidence = f.confidence.labels(model)
        self._bounds = np.asarray(CONFIDENCE_BUCKETS, dtype=np.float64)  # +Inf bucket: index len(...)
        self._low_margin = f.low_margin.labels(model)
        self._lock = threading.Lock()
        self._expected: _Expected | None = None
        if reference is None:
            log.warning(NO_REFERENCE_WARNING)
        else:
            try:
                self._expected = _Expected.build(reference, self.labels)
            except ValueError as exc:
                log.warning("%s (model %s: %s)", NO_REFERENCE_WARNING, model, exc)
        # The window: a ring of multi-hot label rows and top scores; `_head` is the next row to write.
        self._hot = np.zeros((window, len(self.labels)), dtype=np.uint8)
        self._top = np.zeros(window, dtype=np.float32)
        self._when = np.zeros(window, dtype=np.float64)  # time.monotonic() of each row's batch (time window)
        self._head = 0
        self._filled = 0
        self._multiprocess = f.label_psi is not None
        self._next_refresh = 0.0
        if self._expected is not None:
            if f.drift is not None:
                f.drift.add(self)
            else:
                self.refresh()  # NaN series from the start, so the panels and the alert see the model

    @property
    def drift_enabled(self) -> bool:
        return self._expected is not None

    def observe(self, scores: npt.NDArray[np.floating], predicted: Sequence[Sequence[int]]) -> None:
        """Count one batch: `scores` [rows, labels] calibrated probabilities, `predicted` label indices per row."""
        n = scores.shape[0]
        if n == 0:
            return
        if scores.shape[1] >= 2:
            # A full sort of a few labels is cheaper than np.partition's overhead; partition wins for many labels.
            ordered = np.sort(scores, axis=1) if scores.shape[1] <= 32 else np.partition(scores, -2, axis=1)
            top = ordered[:, -1]
            low = int(np.count_nonzero(top - ordered[:, -2] < self.low_margin))
        else:
            top = scores[:, 0]
            low = 0
        lengths = np.fromiter(map(len, predicted), dtype=np.intp, count=n)
        flat = np.fromiter(itertools.chain.from_iterable(predicted), dtype=np.intp, count=int(lengths.sum()))
        counts = np.bincount(flat, minlength=len(self.labels))
        for i in np.flatnonzero(counts).tolist():
            self._label_counters[i].inc(int(counts[i]))
        if low:
            self._low_margin.inc(low)
        self._observe_confidence(top)
        if self._expected is None:
            return
        now = time.monotonic()
        with self._lock:
            if n > self.window:  # only the last `window` rows can stay
                cut = n - self.window
                flat = flat[np.repeat(np.arange(n), lengths) >= cut]
                lengths, top, n = lengths[cut:], top[cut:], self.window
            head, end = self._head, self._head + n
            if end <= self.window:  # no wrap-around: slices, the cheap case
                self._hot[head:end] = 0
                self._hot[np.repeat(np.arange(head, end), lengths), flat] = 1
                self._top[head:end] = top
                self._when[head:end] = now
            else:
                pos = np.arange(head, end) % self.window
                self._hot[pos] = 0
                self._hot[np.repeat(pos, lengths), flat] = 1
                self._top[pos] = top
                self._when[pos] = now
            self._head = (self._head + n) % self.window
            self._filled = min(self._filled + n, self.window)
        if self._multiprocess and now >= self._next_refresh:
            self.refresh()

    def _observe_confidence(self, top: npt.NDArray[np.floating]) -> None:
        """The histogram, a bucket increment per occupied bucket rather than a Histogram.observe per row."""
        if len(top) <= 2:
            for value in top.tolist():
                self._confidence.observe(value)
            return
        # Histogram keeps per-bucket (not cumulative) counts; `amount <= bound` is searchsorted's side="left".
        index = np.searchsorted(self._bounds, top.astype(np.float64), side="left")  # compare as observe does
        bucket_counts = np.bincount(index, minlength=len(CONFIDENCE_BUCKETS) + 1)
        child = self._confidence
        for i in np.flatnonzero(bucket_counts).tolist():
            child._buckets[i].inc(int(bucket_counts[i]))
        child._sum.inc(float(top.sum()))

    def drift(self) -> tuple[float, float]:
        """(label PSI, confidence PSI) of the current window; NaN while it is too small or drift is off."""
        expected = self._expected
        if expected is None:
            return math.nan, math.nan
        with self._lock:
            filled = self._filled
            hot, top = self._hot[:filled], self._top[:filled].astype(np.float64)
            if self.window_s > 0:
                recent = self._when[:filled] >= time.monotonic() - self.window_s
                hot, top = hot[recent], top[recent]
            if len(top) < min(MIN_ROWS, self.window):
                return math.nan, math.nan
            label_counts = hot.sum(axis=0, dtype=np.int64)
        top = np.clip(top, expected.edges[0], expected.edges[-1])
        confidence_counts, _ = np.histogram(top, bins=expected.edges)
        return psi(expected.labels, label_counts), psi(expected.confidence, confidence_counts)

    def refresh(self) -> None:
        """Multi-process mode: recompute the PSI gauges now (observe does it at most once a second)."""
        f = self._families
        if f.label_psi is None or f.confidence_psi is None or self._expected is None:
            return
        self._next_refresh = time.monotonic() + MULTIPROCESS_REFRESH_S
        label_psi, confidence_psi = self.drift()
        f.label_psi.labels(self.model).set(label_psi)
        f.confidence_psi.labels(self.model).set(confidence_psi)

    def close(self) -> None:
        """The model was unloaded: stop exporting its drift (its counters stay, as counters should)."""
        f = self._families
        if f.drift is not None:
            f.drift.discard(self)
        elif f.label_psi is not None and f.confidence_psi is not None and self._expected is not None:
            f.label_psi.labels(self.model).set(math.nan)
            f.confidence_psi.labels(self.model).set(math.nan)
