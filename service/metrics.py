"""All Prometheus collectors of the service, in one registry per application.

Histograms rather than summaries: quantiles of histograms aggregate across pods in PromQL
(`histogram_quantile(0.99, sum by (le) (rate(..._bucket[1m])))`), summaries do not.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Millisecond-resolution latency buckets, from 1 ms to 30 s.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
PADDING_BUCKETS = (1.0, 1.05, 1.1, 1.2, 1.35, 1.5, 2.0, 3.0, 5.0)

REJECT_REASONS = ("queue_full", "deadline", "too_large", "disconnected", "not_ready", "unauthorized", "invalid")


class Metrics:
    """The collectors; one instance per app so that tests and reloads never share global state."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "bertserve_request_duration_seconds",
            "Time from request arrival to response, by endpoint and HTTP status.",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "bertserve_requests", "HTTP requests answered, by endpoint and status.", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "bertserve_queue_duration_seconds",
            "Time a sequence waited in the queue before its batch started computing.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenize_duration = Histogram(
            "bertserve_tokenize_duration_seconds",
            "Time to tokenize one request's inputs.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "bertserve_inference_duration_seconds",
            "Time of one batch in the model runtime (padding, session.run, softmax).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "bertserve_batch_size", "Sequences per inference batch.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "bertserve_batch_tokens",
            "Padded tokens (sequences x longest sequence) per inference batch.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_padding = Histogram(
            "bertserve_batch_padding_ratio",
            "Padded tokens / real tokens per batch; 1.0 means no padding at all.",
            buckets=PADDING_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "bertserve_queue_depth", "Sequences waiting for a batch.", registry=r
        )  # fmt: skip
        self.inflight = Gauge("bertserve_inflight_requests", "HTTP requests being handled.", registry=r)
        self.rejected = Counter(
            "bertserve_rejected", "Requests or sequences refused without compute, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.model_info = Gauge(
            "bertserve_model_info",
            "The model being served (value 1): name, version, variant and the execution provider in use.",
            ["name", "version", "variant", "provider"],
            registry=r,
        )
        self.batch_failures = Counter(
            "bertserve_batch_failures", "Inference batches that raised an error.", registry=r
        )

    def set_model(self, name: str, version: str, variant: str, provider: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, variant, provider).set(1)
