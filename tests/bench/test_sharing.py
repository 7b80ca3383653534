"""python -m ttaserve.bench.sharing: shared passes give each session what it gets alone."""

from __future__ import annotations

import pytest
import torch

from ttaserve.bench.sharing import main, measure


def test_shared_rounds_answer_like_the_sessions_alone() -> None:
    images = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    result = measure(["alpha-bn", "unmix-tns", "adanpc"], sessions=4, batch=4, reps=2, images=images,
                     adanpc_entries=10_000)
    assert result["max_abs_diff"] <= 1e-5
    assert result["sequential_ms"] > 0 and result["shared_ms"] > 0 and result["speedup"] > 0


def test_the_command_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--sessions", "2", "--batch", "2", "--reps", "1", "--sets", "source"])
    out = capsys.readouterr().out
    assert "| source |" in out and "speedup" in out
