"""The live page in a real headless Chromium while a client stream drifts from clean to
corrupted data: the drift chart must move, and a screenshot is kept
(``ttaserve-results/dashboard.png``)."""

from __future__ import annotations

import html
import json
import re
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Stream, chromium, clean_images, corrupted
from tests.server.conftest import Handle, running_server

RESULTS = Path(__file__).resolve().parents[2] / "ttaserve-results"
pytestmark = pytest.mark.slow


def drift_chart(dom: str) -> dict[str, Any]:
    """What the page drew: the drift chart's data attributes and its line paths."""
    tag = re.search(r'<svg[^>]*id="drift-chart"[^>]*>', dom)
    assert tag, "no drift chart in the page"
    attrs = {k: html.unescape(v) for k, v in re.findall(r'data-([a-z]+)="([^"]*)"', tag.group(0))}
    refreshes = re.search(r'<body[^>]*data-refreshes="(\d+)"', dom)
    assert refreshes, "the page never loaded its data"
    paths = re.findall(r'<path d="([^"]+)"[^>]*data-series="demo/alpha-bn"', dom)
    return {"latest": json.loads(attrs["latest"]), "points": int(attrs["points"]), "paths": paths}


def summary_drift(handle: Handle) -> float | None:
    base = handle.server.metrics_http.base_url  # type: ignore[union-attr]
    models = json.load(urllib.request.urlopen(f"{base}api/summary", timeout=10))["models"]
    return next((m["drift"] for m in models if m["policy"] == "alpha-bn"), None)


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_drift_chart_moves_when_the_stream_shifts(tmp_path: Path) -> None:
    clean = clean_images()
    with running_server(policy="alpha-bn") as handle:
        base = handle.server.metrics_http.base_url  # type: ignore[union-attr]
        stream = Stream(handle.url, "camera-1", clean)
        stream.start()
        try:
            wait_for(lambda: stream.sent >= 10, 60, "clean batches")
            time.sleep(2.5)  # a few history samples of the clean phase
            before = drift_chart(chromium(tmp_path / "profile-1", "--dump-dom", base))
            clean_drift = summary_drift(handle)
            stream.data = corrupted(clean)
            wait_for(lambda: (summary_drift(handle) or 0) > 20 * (clean_drift or 1), 60, "the drift to rise")
            time.sleep(2.5)
            after = drift_chart(chromium(tmp_path / "profile-2", "--dump-dom", base))
            shot = tmp_path / "dashboard.png"
            chromium(tmp_path / "profile-3", "--window-size=1280,1000", f"--screenshot={shot}", base)
        finally:
            stream.stop()
    assert before["latest"]["demo/alpha-bn"] < 0.05  # clean Fashion-MNIST looks like training data
    assert after["latest"]["demo/alpha-bn"] > 10 * before["latest"]["demo/alpha-bn"]
    assert after["points"] > before["points"] and after["paths"] != before["paths"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    RESULTS.mkdir(exist_ok=True)
    shutil.copy(shot, RESULTS / "dashboard.png")
