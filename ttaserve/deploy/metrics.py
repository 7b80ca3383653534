"""Every replica's Prometheus metrics in one place, labelled by replica.

Each replica serves its own ``/metrics`` (on a free port) and announces it in the state
store; the ``ray-serve`` driver's ``/metrics`` scrapes them all at scrape time and adds
``replica="<id>"`` to every sample, plus ``ttaserve_replica_up{replica}`` (0 when an
announced replica does not answer). ``/targets`` lists the replica endpoints in Prometheus'
HTTP service-discovery format, for scraping them directly instead.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ttaserve.deploy.stores import SnapshotStore

log = logging.getLogger(__name__)

REGISTRY = "_replicas"  # store "model" under which replicas announce themselves
SCRAPE_TIMEOUT_S = 2.0
ANNOUNCE_EVERY_S = 10.0  # replicas refresh their announcement this often
ANNOUNCEMENT_TTL_S = 60.0  # older announcements are a dead replica's: removed


def announced(store: SnapshotStore, now: float | None = None) -> list[dict[str, Any]]:
    """The live replicas' announcements (``replica``, ``grpc``, ``metrics``, ``pid``,
    ``seen``); stale or unreadable ones are deleted (if unchanged since read)."""
    now = time.time() if now is None else now
    found = []
    for key in store.keys(f"{REGISTRY}/"):
        record = store.read(key)
        if record is None:
            continue
        try:
            info = json.loads(record.data)
            fresh = now - float(info["seen"]) < ANNOUNCEMENT_TTL_S
        except (ValueError, KeyError, TypeError):
            fresh = False
        if fresh:
            found.append(info)
        else:
            store.delete(key, expect=record.token)
    return found


def with_label(family: Metric, name: str, value: str) -> Metric:
    out = Metric(family.name, family.documentation, family.type, family.unit)
    for s in family.samples:
        out.add_sample(s.name, {**s.labels, name: value}, s.value, s.timestamp, s.exemplar)
    return out


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:  # noqa: S310 (announced http URL)
        return str(response.read().decode())


class ReplicaMetrics(Collector):
    """A collector that scrapes the announced replicas whenever it is collected."""

    def __init__(self, store: SnapshotStore, get: Callable[[str], str] = fetch) -> None:
        self.store, self.get = store, get

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        up = GaugeMetricFamily("ttaserve_replica_up", "1 if the replica answered this scrape",
                               labels=["replica"])
        for info in announced(self.store):
            replica, url = str(info.get("replica")), info.get("metrics")
            families = self._scrape(replica, url) if url else None
            up.add_metric([replica], 0.0 if families is None else 1.0)
            for family in families or ():
                labelled = with_label(family, "replica", replica)
                if family.name in merged:
                    merged[family.name].samples.extend(labelled.samples)
                else:
                    merged[family.name] = labelled
        yield up
        yield from merged.values()

    def _scrape(self, replica: str, url: str) -> Iterable[Metric] | None:
        try:
            return list(text_string_to_metric_families(self.get(url)))
        except Exception as exc:  # a dead replica must not break the scrape of the others
            log.debug("replica %s did not answer %s: %s", replica, url, exc)
            return None


def targets(store: SnapshotStore) -> list[dict[str, Any]]:
    """Prometheus HTTP service discovery: one target group per replica."""
    groups = []
    for info in announced(store):
        url = str(info.get("metrics") or "")
        if url.startswith("http://"):
            host = url[len("http://"):].split("/", 1)[0]
            groups.append({"targets": [host], "labels": {"replica": str(info.get("replica"))}})
    return groups


def serve_metrics(store: SnapshotStore, host: str, port: int) -> Any:
    """``/metrics`` (every replica, labelled) and ``/targets`` on host:port, in a thread."""
    from prometheus_client import CollectorRegistry

    from ttaserve.server.metrics_http import MetricsHTTPServer

    registry = CollectorRegistry()
    registry.register(ReplicaMetrics(store))

    def page(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") != "/targets":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"every replica's metrics: /metrics; Prometheus HTTP service discovery: /targets\n"]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(targets(store)).encode()]

    return MetricsHTTPServer(registry, host, port, page)


def main(argv: list[str] | None = None) -> int:
    """``python -m ttaserve.deploy.metrics --state-store URL``: the aggregated endpoint on its
    own, e.g. beside a Ray cluster started from a Serve config (Kubernetes RayService)."""
    import argparse
    import signal
    import threading

    from ttaserve.deploy.stores import open_store

    parser = argparse.ArgumentParser(prog="python -m ttaserve.deploy.metrics", description=main.__doc__)
    parser.add_argument("--state-store", required=True, metavar="URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args(argv)
    http = serve_metrics(open_store(args.state_store), args.host, args.port)
    print(f"replica metrics on {http.url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    http.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
