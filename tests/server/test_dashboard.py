"""The live page and its JSON API on the metrics port, against a real server."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest

from tests.server.conftest import Handle, images, infer_input, running_server
from ttaserve.errors import PermissionDenied, Unauthenticated
from ttaserve.server.auth import Tokens, default_name
from ttaserve.server.dashboard import is_loopback, refuse_reset


def http(handle: Handle, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    assert handle.server.metrics_http is not None
    request = urllib.request.Request(handle.server.metrics_http.base_url + path.lstrip("/"),
                                     method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            status = response.status
            kind = response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        body, status, kind = exc.read(), exc.code, exc.headers["Content-Type"]
    return status, json.loads(body) if kind == "application/json" else body.decode()


def low_contrast(n: int, seed: int = 0) -> np.ndarray:
    """Nearly flat grey images: far from anything the demo model was trained on."""
    return (0.5 + 0.05 * (images(n, seed) - 0.5)).astype(np.float32)


def send(handle: Handle, x: np.ndarray, sequence: int | str, policy: str | None = None) -> None:
    parameters = {"tta_policy": policy} if policy else None
    handle.client().infer("demo", [infer_input(x)], sequence_id=sequence, parameters=parameters)


@pytest.fixture(scope="module")
def served() -> Iterator[Handle]:
    with running_server(policy="alpha-bn") as handle:
        send(handle, images(16, 1), 11)
        send(handle, images(16, 2), 11)
        send(handle, low_contrast(16), "cam/2 é", policy="source")
        yield handle


def test_page_is_self_contained(served: Handle) -> None:
    status, page = http(served, "/")
    assert status == 200
    assert 'id="drift-chart"' in page and "<script>" in page and "<style>" in page
    # Nothing to fetch from elsewhere: no external src/href, and the CSP forbids it anyway.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"""fetch\(\s*["'`]https?:""", page)
    with urllib.request.urlopen(served.server.metrics_http.base_url, timeout=10) as response:  # type: ignore[union-attr]
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_metrics_stay_at_metrics(served: Handle) -> None:
    status, text = http(served, "/metrics")
    assert status == 200 and "ttaserve_requests_total" in text


def test_summary_reports_each_model_policy(served: Handle) -> None:
    status, summary = http(served, "/api/summary")
    assert status == 200 and summary["reset"] == "loopback"
    groups = {(g["model"], g["policy"]): g for g in summary["models"]}
    alpha, src = groups[("demo", "alpha-bn")], groups[("demo", "source")]
    assert alpha["sessions"] == 1 and alpha["requests"] == {"OK": 2}
    assert src["sessions"] == 1 and src["requests"] == {"OK": 1}
    assert src["drift"] > alpha["drift"] > 0
    assert 0 <= alpha["label_shift"] <= 1 and alpha["entropy"] > 0


def test_history_is_sampled_server_side(served: Handle) -> None:
    deadline = time.monotonic() + 10
    series: dict[str, Any] = {}
    while time.monotonic() < deadline and "demo/source" not in series:
        time.sleep(0.2)
        history = http(served, "/api/summary")[1]["history"]
        series = history[-1]["series"] if history else {}
    assert series["demo/source"]["sessions"] == 1 and series["demo/source"]["drift"] > 0
    assert [s["t"] for s in history] == sorted(s["t"] for s in history)


def test_sessions_are_ranked_by_drift_with_their_policy(served: Handle) -> None:
    status, body = http(served, "/api/sessions?limit=5")
    assert status == 200 and body["total"] == 2
    first, second = body["sessions"]
    assert (first["sequence_id"], first["policy"]) == ("cam/2 é", "source")
    assert (second["sequence_id"], second["policy"], second["batches"]) == (11, "alpha-bn", 2)
    assert first["drift"] > second["drift"]
    assert [s["sequence_id"] for s in http(served, "/api/sessions?limit=1")[1]["sessions"]] == ["cam/2 é"]
    assert http(served, "/api/sessions?limit=0")[0] == 400


def test_reset_over_http_clears_the_session_signals() -> None:
    with running_server(policy="alpha-bn") as handle:
        send(handle, low_contrast(8), "a/b é")
        status, body = http(handle, f"/api/sessions/demo/{quote('a/b é', safe='')}/reset", "POST")
        assert status == 200
        assert body["session"]["resets"] == 1 and body["session"]["drift"] is None
        session = handle.session("a/b é")
        assert session.drift is None and session.resets["operator"] == 1
        assert 'ttaserve_session_resets_total{model="demo",policy="alpha-bn",reason="operator"} 1.0' in http(handle, "/metrics")[1]


@pytest.mark.parametrize(("path", "method", "headers", "status"), [
    ("/api/sessions/demo/999/reset", "POST", {}, 404),
    ("/api/sessions/nope/11/reset", "POST", {}, 404),
    ("/api/sessions/demo/11/reset", "GET", {}, 405),
    ("/api/summary", "POST", {}, 405),
    ("/api/nothing", "GET", {}, 404),
    ("/api/sessions/demo/11/reset", "POST", {"Origin": "http://evil.example"}, 403),
    ("/api/sessions/demo/11/reset", "POST", {"Host": "evil.example:8002"}, 403),
])
def test_bad_requests_change_nothing(served: Handle, path: str, method: str, headers: dict[str, str], status: int) -> None:
    before = served.session(11).resets.copy()
    code, body = http(served, path, method, headers)
    assert code == status and body["error"]
    assert served.session(11).resets == before


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Handle]:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text("inference infer-token\nadmin admin-token\n")
    with running_server(auth_token_file=str(path)) as handle:
        handle.client().infer("demo", [infer_input(images(4))], sequence_id=5,
                              headers={"authorization": "Bearer infer-token"})
        yield handle


@pytest.mark.parametrize(("token", "status"), [(None, 401), ("wrong", 401), ("infer-token", 403), ("admin-token", 200)])
def test_reset_with_tokens_needs_an_admin_token(secured: Handle, token: str | None, status: int) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    owner = default_name(b"infer-token")  # the principal of the token that sent sequence 5
    code, body = http(secured, f"/api/sessions/demo/5/reset?owner={owner}", "POST", headers)
    assert code == status
    admin = {"Authorization": "Bearer admin-token"}
    assert http(secured, "/api/summary", headers=admin)[1]["reset"] == "admin-token"


def test_reset_policy_without_tokens() -> None:
    none = Tokens()
    refuse_reset(none, "127.0.0.1", {"host": "localhost:8002"})
    refuse_reset(none, "::1", {"host": "[::1]:8002", "origin": "http://[::1]:8002"})
    with pytest.raises(PermissionDenied, match="admin token"):
        refuse_reset(none, "0.0.0.0", {"host": "10.0.0.5:8002"})
    with pytest.raises(PermissionDenied, match="cross-origin"):
        refuse_reset(none, "127.0.0.1", {"host": "127.0.0.1:8002", "origin": "null"})
    admin = Tokens(admin=(b"secret",))
    refuse_reset(admin, "0.0.0.0", {"host": "10.0.0.5:8002", "authorization": "Bearer secret"})
    with pytest.raises(Unauthenticated):
        refuse_reset(admin, "127.0.0.1", {"host": "127.0.0.1:8002"})
    assert is_loopback("127.0.0.2") and is_loopback("[::1]") and not is_loopback("example.org")
