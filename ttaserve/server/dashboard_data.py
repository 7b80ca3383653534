"""What the live page shows, as plain JSON-able data: session rows, per model/policy
summaries and a short server-side history of them.

The history is sampled by a background thread (once a second, the last ten minutes), so a
page opened after the fact still shows how drift evolved; it costs one pass over the live
sessions per sample, the same work as one Prometheus scrape."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter

from ttaserve.server.keys import key_of
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.repository import Repository

log = logging.getLogger(__name__)

# Drift signals shown by the page, keyed by their names in DriftTracker.signals.
SIGNALS = {"drift": "norm_divergence", "entropy": "entropy", "label_shift": "label_shift"}


def session_rows(repository: Repository, owner: str | None = None) -> list[dict[str, Any]]:
    """Every live session (of ``owner`` only, if given) with its owner, policy, counters and
    drift signals (None before its first batch or right after a reset). Stream-scoped
    sessions have no sequence id (None)."""
    rows = []
    now = time.monotonic()
    for model in repository:
        for session in model.engine.sessions.live():
            key = key_of(session)
            if owner is not None and key.owner != owner:
                continue
            signals = model.engine.signals_of(session)
            rows.append({
                "model": model.name, "owner": key.owner, "sequence_id": key.sequence_id, "policy": session.policy,
                "batches": session.batches, "samples": session.samples,
                "resets": sum(session.resets.values()), "fallbacks": sum(session.fallbacks.values()),
                "on_source": session.safety is not None and session.safety.falling_back, "idle_s": round(max(0.0, now - session.last_active), 1),
                **{key: signals.get(name) for key, name in SIGNALS.items()},
            })
    return rows


def top_by_drift(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The ``limit`` sessions that drift most; sessions without signals come last."""
    return sorted(rows, key=lambda r: (r["drift"] is None, -(r["drift"] or 0.0)))[:limit]


def summarize(repository: Repository, metrics: ServerMetrics) -> list[dict[str, Any]]:
    """One entry per (model, policy) seen in live sessions or in the request counters:
    session count, mean signals over live sessions (as exported to Prometheus), requests by
    status code and resets by reason."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}

    def group(model: str, policy: str) -> dict[str, Any]:
        if (model, policy) not in groups:
            groups[(model, policy)] = {"model": model, "policy": policy, "sessions": 0, "requests": {},
                                       "resets": {}, "fallbacks": {}, **{key: [] for key in SIGNALS}}
        return groups[(model, policy)]

    # Straight from the sessions, not via session_rows: this runs every second, and
    # session_rows builds and formats a full row per session, which at many thousands of
    # sessions would dominate the sampler.
    for model in repository:
        for session in model.engine.sessions.live():
            entry = group(model.name, session.policy)
            entry["sessions"] += 1
            drift = session.drift  # read once: a reset may clear it meanwhile
            signals = drift.signals if drift is not None else {}
            for key, name in SIGNALS.items():
                if name in signals:
                    entry[key].append(signals[name])
    for labels, value in _counter_values(metrics.requests):
        group(labels["model"], labels["policy"])["requests"][labels["code"]] = value
    for labels, value in _counter_values(metrics.resets):
        group(labels["model"], labels["policy"])["resets"][labels["reason"]] = value
    for labels, value in _counter_values(metrics.fallbacks):
        group(labels["model"], labels["policy"])["fallbacks"][labels["reason"]] = value
    for entry in groups.values():
        for key in SIGNALS:
            values = entry[key]
            entry[key] = sum(values) / len(values) if values else None
    return sorted(groups.values(), key=lambda e: (e["model"], e["policy"]))


def _counter_values(counter: Counter) -> Iterable[tuple[dict[str, str], float]]:
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                yield sample.labels, sample.value


class History:
    """The last ``keep`` samples of ``take()``, one every ``every_s`` seconds, taken by a
    daemon thread until :meth:`close`."""

    def __init__(self, take: Callable[[], dict[str, Any]], every_s: float = 1.0, keep: int = 600) -> None:
        self._take = take
        self._every_s = every_s
        self._samples: deque[dict[str, Any]] = deque(maxlen=keep)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-history", daemon=True)
        self._thread.start()

    def samples(self) -> list[dict[str, Any]]:
        return list(self._samples)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._samples.append({"t": round(time.time(), 3), **self._take()})
            except Exception:  # a failed sample leaves a gap; the page must outlive it
                log.exception("dashboard history sample failed")
            self._stop.wait(self._every_s)


def history_point(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """The part of a summary worth keeping over time, keyed ``model/policy``."""
    return {"series": {
        f"{e['model']}/{e['policy']}": {
            "sessions": e["sessions"], "requests": sum(e["requests"].values()),
            **{key: e[key] for key in SIGNALS},
        }
        for e in summary
    }}
