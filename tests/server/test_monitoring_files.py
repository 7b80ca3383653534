"""deploy/prometheus.yml and the Grafana dashboard: well-formed, and every metric they
query is one a running server actually exports."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import images, infer_input, running_server

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GRAFANA = DEPLOY / "grafana" / "ttaserve-dashboard.json"
METRIC = re.compile(r"\bttaserve_[a-z_]+\b")


def exported_sample_names() -> set[str]:
    """Sample names after traffic that touches every metric: sessions with signals, a
    session end, a failed request and an operator reset."""
    with running_server(policy="alpha-bn") as handle:
        client = handle.client()
        client.infer("demo", [infer_input(images(8))], sequence_id=1)
        client.infer("demo", [infer_input(images(8, 1))], sequence_id=2, sequence_end=True)
        try:
            client.infer("demo", [infer_input(images(8) * 2)], sequence_id=1)  # out of range
        except Exception:
            pass
        base = handle.server.metrics_http.base_url  # type: ignore[union-attr]
        urllib.request.urlopen(urllib.request.Request(f"{base}api/sessions/demo/1/reset", method="POST"), timeout=10)
        client.infer("demo", [infer_input(images(8, 2))], sequence_id=1)
        text = urllib.request.urlopen(handle.metrics_url, timeout=10).read().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def grafana_queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_grafana_dashboard_is_importable_json() -> None:
    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and set(panel["gridPos"]) == {"x", "y", "w", "h"}
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("request rate", "latency", "sessions", "drift", "entropy", "label shift", "resets"):
        assert wanted in titles


def test_prometheus_config_scrapes_the_default_metrics_port() -> None:
    text = (DEPLOY / "prometheus.yml").read_text()
    assert "\t" not in text  # YAML forbids tabs; promtool checks the rest in the slow suite
    assert re.search(r"^scrape_configs:\s*$", text, re.M)
    assert re.search(r"metrics_path:\s*/metrics\s*$", text, re.M)
    assert '"127.0.0.1:8002"' in text


def test_every_queried_metric_is_exported() -> None:
    queried = set(METRIC.findall(" ".join(grafana_queries(json.loads(GRAFANA.read_text())))))
    queried |= set(METRIC.findall((DEPLOY / "prometheus.yml").read_text()))
    assert {"ttaserve_drift_score", "ttaserve_session_resets_total", "ttaserve_requests_total"} <= queried
    missing = queried - exported_sample_names()
    assert not missing, f"queried but not exported: {sorted(missing)}"
