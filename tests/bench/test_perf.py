"""``ttaserve bench perf --quick`` end to end: real engines, real server subprocesses, stock
tritonclient. Checks that the outputs exist and are sane, never how fast anything is."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from ttaserve.bench.perf import POLICIES
from ttaserve.bench.perf_report import GOALS, check_goals, shown, table
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


def test_source_alone_writes_its_table(tmp_path: Path) -> None:
    """``--policies source`` has nothing to compare source with: the table still shows
    source's own times (this used to end in StopIteration with no perf.md)."""
    argv = ["bench", "perf", "--quick", "--policies", "source", "--batch-sizes", "64", "--no-server",
            "--no-onnx", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    result, text = json.loads((tmp_path / "perf.json").read_text()), (tmp_path / "perf.md").read_text()
    cell = result["overhead"]["64"]
    assert cell["policies"] == {} and cell["source"]["source_raw_ms"] > 0
    assert cell["source"]["source_engine_vs_forward"]["median"] > 0
    assert "source per batch (ms), forward / through the engine: b64 " in text
    assert (tmp_path / "perf.png").exists()


def _goal_result(**parts: Any) -> dict[str, Any]:
    row = {"engine": {"median": 1.1004}, "raw": {"median": 1.0996}}
    return {"overhead": {"64": {"policies": {"alpha-bn": row}}}, "memory": {}, **parts}


def test_goal_checks_never_print_the_goal_for_a_value_that_misses_it() -> None:
    goals = {g["goal"].split()[0]: g for g in check_goals(_goal_result(grpc={"ratio": 0.8496}))}
    assert goals["gRPC"]["measured"] == "0.8496" and goals["gRPC"]["met"] is False
    assert goals["alpha-bn"]["measured"] == "engine 1.1004×, raw 1.0996×" and goals["alpha-bn"]["met"] is False
    far = {g["goal"].split()[0]: g for g in check_goals(_goal_result(grpc={"ratio": 0.8123}))}
    assert far["gRPC"]["measured"] == "0.81"
    assert shown(0.847, 0.85) == "0.847" and shown(0.85, 0.85) == "0.85" and shown(1.23, None) == "1.23"


def test_graded_bn_is_timed_with_the_servers_safety_net() -> None:
    import torch

    from ttaserve.bench.perf_inproc import Subject, bench_model
    from ttaserve.server.app import safety_config
    from ttaserve.server.settings import ServerSettings

    assert "graded-bn" in POLICIES
    subject = Subject.of(bench_model(100), "graded-bn")
    served, timed = safety_config(ServerSettings()), subject.engine.safety
    # the checks run as served (same share of samples through source), but no verdict can
    # switch the timed session to source
    assert timed.enabled and timed.check_fraction == served.check_fraction
    assert timed.warmup_fraction == served.warmup_fraction and timed.min_check == served.min_check
    assert timed.entropy_margin >= 1.0 and timed.collapse_ratio == 0.0
    subject.call("engine")(torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    session = subject.engine.sessions.get("bench")
    assert session is not None and session.safety is not None
