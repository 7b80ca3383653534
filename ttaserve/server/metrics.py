"""Prometheus metrics (prefix ``ttaserve_``; seconds and counts; never a sequence-id label)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """All metrics of one server, registered in ``registry`` (a fresh one by default, so
    several servers in one process never collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ttaserve_requests", "Inference requests by model, policy and status code",
            ["model", "policy", "code"], registry=r)
        self.request_seconds = Histogram(
            "ttaserve_request_duration_seconds", "Time from request arrival to response",
            ["model", "policy"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram(
            "ttaserve_queue_duration_seconds", "Time a request waited for its model's worker",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram(
            "ttaserve_compute_duration_seconds", "Forward pass plus adaptation step",
            ["model", "policy"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "ttaserve_batch_size", "Samples per forward pass", ["model"],
            buckets=_BATCH_BUCKETS, registry=r)
        self.live_sessions = Gauge(
            "ttaserve_live_sessions", "Adaptation sessions currently held", ["model"], registry=r)
        self.session_events = Counter(
            "ttaserve_session_events", "Sessions started, ended, expired or evicted",
            ["model", "event"], registry=r)
        self.resets = Counter(
            "ttaserve_session_resets", "Session state resets by reason",
            ["model", "policy", "reason"], registry=r)
