"""``ttaserve bench perf --quick`` end to end: real engines, real server subprocesses, stock
tritonclient. Checks that the outputs exist and are sane, never how fast anything is."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from ttaserve.bench.perf import POLICIES
from ttaserve.bench.perf_report import GOALS, check_goals, table
from ttaserve.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("perf")
    assert main(["bench", "perf", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "perf.json").read_text()), (out / "perf.md").read_text()


def test_writes_json_table_and_chart(run: tuple[Path, dict[str, Any], str]) -> None:
    out, result, text = run
    assert (out / "perf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result) >= {"config", "machine", "overhead", "memory", "grpc", "sessions", "goals"}
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["nproc"] >= 1
    assert len(result["machine"]["load_avg_start"]) == 3 and "load_avg_end" in result["machine"]
    assert "| alpha-bn |" in text and "gRPC" in text


def test_overhead_ratios_are_positive_for_every_policy_and_batch(run: tuple[Path, dict[str, Any], str]) -> None:
    _, result, _ = run
    assert set(result["overhead"]) == {str(b) for b in result["config"]["batch_sizes"]}
    for cell in result["overhead"].values():
        assert set(cell["policies"]) == set(POLICIES) - {"source"}
        for row in cell["policies"].values():
            for path in ("engine", "raw", "engine_vs_forward", "source_engine_vs_forward"):
                stats = row[path]
                assert 0 < stats["q1"] <= stats["median"] <= stats["q3"] and math.isfinite(stats["q3"])
            assert row["raw_ms"] > 0 and row["source_raw_ms"] > 0


def test_server_parts_are_sane_and_responses_match_isolated_runs(run: tuple[Path, dict[str, Any], str]) -> None:
    _, result, _ = run
    grpc, sessions = result["grpc"], result["sessions"]
    assert grpc["batch"] == 64 and grpc["ratio"] > 0 and grpc["grpc_img_s"] > 0
    assert grpc["max_abs_diff"] <= 1e-5
    assert sessions["sequences"] == 32 and sessions["batch"] == 8
    for key in ("sequential_img_s", "concurrent_img_s", "batched_img_s", "batched_vs_sequential"):
        assert sessions[key] > 0
    assert set(sessions["max_abs_diff_vs_isolated"]) == {"sequential", "concurrent", "batched"}
    assert max(sessions["max_abs_diff_vs_isolated"].values()) <= 1e-5
    assert sessions["batched_mean_forward_images"] >= 8  # whole requests per forward, never split


def test_memory_rows_and_goals(run: tuple[Path, dict[str, Any], str]) -> None:
    _, result, _ = run
    memory = result["memory"]
    assert set(memory) == set(POLICIES)
    assert memory["source"]["state_bytes_steady"] == 0
    assert memory["unmix-tns"]["state_bytes_initial"] > 0 and memory["ecotta"]["state_bytes_initial"] > 0
    assert all(m["peak_step_bytes_raw"] > 0 for m in memory.values())
    goals = {g["goal"]: g for g in result["goals"]}
    assert len(goals) == len(GOALS) + 3  # overheads, gRPC, many sessions, memory
    assert all(g["met"] is None for name, g in goals.items() if "at b64" in name)  # b64 not run
    assert check_goals(result) == result["goals"] and table(result)


def test_onnx_runtime_part(run: tuple[Path, dict[str, Any], str]) -> None:
    _, result, text = run
    onnx = result["onnx"]
    assert onnx["status"] == "ok" and onnx["threads"] == 1 and onnx["providers"] == ["CPUExecutionProvider"]
    assert onnx["policies"] == ["source", "alpha-bn", "tbn", "unmix-tns", "adanpc"]
    for b in map(str, result["config"]["batch_sizes"]):
        for policy in onnx["policies"]:
            row = onnx["vs_torch"][b]["policies"][policy]
            assert row["raw"]["median"] > 0 and row["ort_raw_ms"] > 0 and row["torch_raw_ms"] > 0
        assert set(onnx["overhead"][b]["policies"]) == set(onnx["policies"]) - {"source"}
    assert "ONNX Runtime" in text and "overhead on ONNX Runtime" in text
