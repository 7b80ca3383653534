"""Every replica's metrics in one exposition, labelled by replica; dead replicas drop out."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ttaserve.deploy.metrics import ANNOUNCEMENT_TTL_S, REGISTRY, ReplicaMetrics, announced, targets
from ttaserve.deploy.stores import DirectoryStore


def exposition(requests: float) -> str:
    registry = CollectorRegistry()
    Counter("ttaserve_requests", "requests", ["model"], registry=registry).labels("demo").inc(requests)
    Histogram("ttaserve_request_duration_seconds", "latency", ["model"], registry=registry).labels("demo").observe(0.01)
    return generate_latest(registry).decode()


def announce(store: DirectoryStore, replica: str, seen: float) -> None:
    info = {"replica": replica, "metrics": f"http://127.0.0.1:1/{replica}", "seen": seen}
    store.write(f"{REGISTRY}/{replica}", json.dumps(info).encode())


def test_samples_carry_the_replica_label(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    now = time.time()
    for name in ("a", "b", "dead"):
        announce(store, name, now)
    pages = {"http://127.0.0.1:1/a": exposition(3), "http://127.0.0.1:1/b": exposition(5)}

    def get(url: str) -> str:
        if url not in pages:
            raise OSError("connection refused")
        return pages[url]

    registry = CollectorRegistry()
    registry.register(ReplicaMetrics(store, get))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    totals = {s.labels["replica"]: s.value for s in families["ttaserve_requests"].samples
              if s.name == "ttaserve_requests_total"}
    assert totals == {"a": 3.0, "b": 5.0}
    up = {s.labels["replica"]: s.value for s in families["ttaserve_replica_up"].samples}
    assert up == {"a": 1.0, "b": 1.0, "dead": 0.0}
    buckets = [s for s in families["ttaserve_request_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert {s.labels["replica"] for s in buckets} == {"a", "b"} and all("le" in s.labels for s in buckets)


def test_stale_announcements_are_removed(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    now = time.time()
    announce(store, "live", now)
    announce(store, "gone", now - ANNOUNCEMENT_TTL_S - 1)
    store.write(f"{REGISTRY}/garbage", b"not json")
    assert [i["replica"] for i in announced(store, now)] == ["live"]
    assert store.keys(f"{REGISTRY}/") == [f"{REGISTRY}/live"]
    assert targets(store) == [{"targets": ["127.0.0.1:1"], "labels": {"replica": "live"}}]
