"""All Prometheus collectors of the service, in one place, and one coherent exposition across processes.

Histograms rather than summaries: quantiles of histograms aggregate across pods in PromQL
(`histogram_quantile(0.99, sum by (le) (rate(..._bucket[1m])))`), summaries do not.

With one process, collectors live in a registry of their own (tests and reloads never share state). With several
(``api_workers`` > 1: API processes and an engine process), prometheus_client's multiprocess mode is used:
every process writes its samples to files under ``PROMETHEUS_MULTIPROC_DIR`` (set by the supervisor before any
child imports prometheus_client) and ``/metrics`` in any API process merges them into one view. Gauges say
how they merge (``multiprocess_mode``). Label children used on the hot path are bound once
(:class:`ModelMetrics`, the ``rejected_*`` attributes) so a request never pays for a label lookup.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Millisecond-resolution latency buckets, from 1 ms to 30 s.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    30.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
PADDING_BUCKETS = (1.0, 1.05, 1.1, 1.2, 1.35, 1.5, 2.0, 3.0, 5.0)

REJECT_REASONS = ("queue_full", "deadline", "too_large", "disconnected", "not_ready", "unauthorized", "invalid")
CONTENT_TYPE = CONTENT_TYPE_LATEST


def multiprocess_dir() -> str | None:
    """The multiprocess directory when this process is one of several (set before prometheus_client loads)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ModelMetrics:
    """One model version's bound children: what the batcher records per batch and per sequence."""

    def __init__(self, metrics: Metrics, name: str, version: str) -> None:
        labels = (name, version)
        self.queue_duration = metrics.queue_duration.labels(*labels)
        self.inference_duration = metrics.inference_duration.labels(*labels)
        self.batch_size = metrics.batch_size.labels(*labels)
        self.batch_tokens = metrics.batch_tokens.labels(*labels)
        self.batch_padding = metrics.batch_padding.labels(*labels)
        self.queue_depth = metrics.queue_depth.labels(*labels)
        self.batch_failures = metrics.batch_failures.labels(*labels)
        self.rejected_deadline = metrics.rejected_deadline
        self.rejected_disconnected = metrics.rejected_disconnected


class Metrics:
    """The collectors; one instance per app (or per process in multiprocess mode)."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "bertserve_request_duration_seconds",
            "Time from request arrival to response, by endpoint and status.",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "bertserve_requests", "Requests answered, by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.tokenize_duration = Histogram(
            "bertserve_tokenize_duration_seconds",
            "Time to tokenize one request's inputs.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        per_model = ["model", "version"]
        self.queue_duration = Histogram(
            "bertserve_queue_duration_seconds",
            "Time a sequence waited in the queue before its batch started computing.",
            per_model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "bertserve_inference_duration_seconds",
            "Time of one batch in the model runtime (padding, session.run, scores).",
            per_model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "bertserve_batch_size", "Sequences per inference batch.", per_model, buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "bertserve_batch_tokens",
            "Padded tokens (sequences x longest sequence) per inference batch.",
            per_model,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_padding = Histogram(
            "bertserve_batch_padding_ratio",
            "Padded tokens / real tokens per batch; 1.0 means no padding at all.",
            per_model,
            buckets=PADDING_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "bertserve_queue_depth",
            "Sequences waiting for a batch.",
            per_model,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inflight = Gauge(
            "bertserve_inflight_requests", "Requests being handled.", registry=r, multiprocess_mode="livesum"
        )
        self.rejected = Counter(
            "bertserve_rejected", "Requests refused or dropped without compute, by reason.", ["reason"], registry=r
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.rejected_deadline = self.rejected.labels("deadline")
        self.rejected_disconnected = self.rejected.labels("disconnected")
        self.model_info = Gauge(
            "bertserve_model_info",
            "Models being served (value 1): name, version, variant and the execution provider in use.",
            ["name", "version", "variant", "provider"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.batch_failures = Counter(
            "bertserve_batch_failures", "Inference batches that raised an error.", per_model, registry=r
        )

    def for_model(self, name: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, name, version)

    def set_model(self, name: str, version: str, variant: str, provider: str, loaded: bool = True) -> None:
        self.model_info.labels(name, version, variant, provider).set(1 if loaded else 0)
        if not loaded and not self.multiprocess:
            self.model_info.remove(name, version, variant, provider)

    def exposition(self) -> bytes:
        """The text exposition: this registry, or every process's samples merged in multiprocess mode."""
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
