"""Prometheus metrics (prefix ``ttaserve_``; seconds and counts; never a sequence-id label)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
        self.updates_skipped = Counter(
            "ttaserve_updates_skipped", "Adaptation updates rolled back for outlier batches (ttaserve/outliers.py)",
            ["model", "policy", "reason"], registry=r)
        self.session_state_bytes = Gauge(
            "ttaserve_session_state_bytes", "Bytes of session state held, as counted for --max-session-memory",
            ["model"], registry=r)
        self.memory_evictions = Counter(
            "ttaserve_session_memory_evictions", "Sessions evicted because --max-session-memory was reached",
            ["model"], registry=r)
        self.fallbacks = Counter(
            "ttaserve_session_fallbacks", "Safety-net switches of a session to the source model, by reason",
            ["model", "policy", "reason"], registry=r)
        self.rejected = Counter(
            "ttaserve_rejected", "Requests refused by a configured cap, by cap",
            ["model", "cap"], registry=r)
        self.state_writes = Counter(
            "ttaserve_state_writes", "Session state files written (--state-dir), by trigger",
            ["model", "reason"], registry=r)
        self.state_files = Counter(
            "ttaserve_state_files", "State files restored, revived, found corrupt or failed to write",
            ["model", "outcome"], registry=r)
        self.batch_drift = Histogram(
            "ttaserve_batch_drift_score", "Per-batch BN-statistics divergence from source",
            ["model", "policy"], buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100), registry=r)

    def watch_sessions(self, sessions: Callable[[], Iterable[tuple[str, str, dict[str, float]]]]) -> None:
        """Export, at scrape time, the mean drift signals of live sessions per model/policy.
        ``sessions()`` yields (model, policy, signals) for every live session."""
        self.registry.register(_SessionSignals(sessions))


# Signals exported as their own metric names; anything else a policy reports goes to
# ttaserve_policy_signal{signal=...}.
_NAMED = {
    "norm_divergence": ("ttaserve_drift_score", "Mean BN-statistics divergence from source (symmetric KL) of live sessions"),
    "entropy": ("ttaserve_prediction_entropy_nats", "Mean prediction entropy of live sessions"),
    "label_shift": ("ttaserve_label_shift", "Total-variation distance of predicted labels from the source prior"),
}


class _SessionSignals(Collector):
    def __init__(self, sessions: Callable[[], Iterable[tuple[str, str, dict[str, float]]]]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[Any]:
        sums: dict[tuple[str, str, str], list[float]] = {}
        for model, policy, signals in self._sessions():
            for name, value in signals.items():
                sums.setdefault((model, policy, name), []).append(value)
        named = {n: GaugeMetricFamily(m, h, labels=["model", "policy"]) for n, (m, h) in _NAMED.items()}
        other = GaugeMetricFamily("ttaserve_policy_signal", "Policy-specific signals, mean over live sessions",
                                  labels=["model", "policy", "signal"])
        sessions = GaugeMetricFamily("ttaserve_sessions", "Live sessions per model and policy",
                                     labels=["model", "policy"])
        counts: dict[tuple[str, str], int] = {}
        for (model, policy, name), values in sums.items():
            mean = sum(values) / len(values)
            if name in named:
                named[name].add_metric([model, policy], mean)
                counts[(model, policy)] = max(counts.get((model, policy), 0), len(values))
            else:
                other.add_metric([model, policy, name], mean)
        for (model, policy), n in counts.items():
            sessions.add_metric([model, policy], n)
        yield from named.values()
        yield other
        yield sessions
