"""Peers benchmark: a quick real run against every peer installed in .venv-peers
(scripts/bench-peers.sh makes it), plus the failure path, which needs no peer at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ttaserve.bench.peers import PEERS, format_table, run_peers

CONCURRENCIES = (1, 4)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("peers")
    return run_peers(out, quick=True, concurrencies=CONCURRENCIES, duration_s=1.5), out


def _served(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in result["servers"].items() if s["status"] == "ok"}


@pytest.mark.slow
def test_every_installed_peer_produces_results(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    assert set(result["servers"]) == set(PEERS)
    assert result["servers"]["ttaserve"]["status"] == "ok", result["servers"]["ttaserve"]
    for name, server in result["servers"].items():
        # a peer may be absent from the virtualenv; one that is installed must work
        assert server["status"] in ("ok", "not-installed"), f"{name}: {server.get('reason')}"


@pytest.mark.slow
def test_throughput_and_latency_at_each_concurrency(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    for name, server in _served(result).items():
        assert [r["concurrency"] for r in server["runs"]] == list(CONCURRENCIES), name
        for run in server["runs"]:
            assert run["errors"] == 0, f"{name}: {run['first_error']}"
            assert run["requests"] > 0 and run["req_per_s"] > 0, name
            assert run["images_per_s"] == pytest.approx(run["req_per_s"] * result["batch"])
            assert 0 < run["p50_ms"] <= run["p99_ms"], name


@pytest.mark.slow
def test_responses_equal_the_in_process_model(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    for name, server in _served(result).items():
        assert server["max_abs_diff"] <= 1e-5, name


@pytest.mark.slow
def test_ratios_come_from_the_same_run(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    own = {r["concurrency"]: r["req_per_s"] for r in result["servers"]["ttaserve"]["runs"]}
    for name, server in _served(result).items():
        if name == "ttaserve":
            continue
        rows = {row["concurrency"]: row for row in result["ratios"][name]}
        assert set(rows) == set(CONCURRENCIES), name
        for run in server["runs"]:
            row = rows[run["concurrency"]]
            assert row["throughput"] == pytest.approx(own[run["concurrency"]] / run["req_per_s"])
            assert row["goal_met"] == (row["throughput"] >= row["goal"])


@pytest.mark.slow
def test_json_chart_and_table_are_written(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, out = quick_run
    assert json.loads((out / "peers.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(result)
    for name in PEERS:
        assert name in table


def test_a_missing_peer_is_recorded_not_raised(tmp_path: Path) -> None:
    result = run_peers(tmp_path, quick=True, concurrencies=(1,), duration_s=0.2, rounds=2,
                       peers=("triton", "torchserve"), peers_venv=tmp_path / "no-such-venv")
    for name in ("triton", "torchserve"):
        server = result["servers"][name]
        assert server["status"] == "not-installed"
        assert "no peers virtualenv" in server["reason"]
        assert server["rounds_done"] == 0  # checked once, not retried in the second round
    assert result["rounds"] == 2 and result["direct"]["req_per_s"] > 0
    assert result["ratios"] == {}
    assert "not-installed" in format_table(result)
    assert (tmp_path / "peers.json").exists() and (tmp_path / "peers.png").exists()


def test_unknown_peer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown peers"):
        run_peers(tmp_path, quick=True, peers=("kserve",))
