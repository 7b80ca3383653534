"""Cross-session batching gives each request what it would get alone."""

from __future__ import annotations

import pytest
import torch

from ttaserve import Engine
from ttaserve.batching import Request, predict_many
from ttaserve.errors import InvalidInput


def _batches(sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 1, 28, 28, generator=gen) * (0.3 + 0.2 * i) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("policy", ["source", "tbn", "alpha-bn"])
def test_shared_forward_equals_each_request_alone(demo_module: torch.nn.Module, policy: str) -> None:
    xs = _batches([8, 3, 1, 16])
    alone = [Engine(demo_module, policy).predict(x, session=f"s{i}") for i, x in enumerate(xs)]
    engine = Engine(demo_module, policy)
    together = predict_many(engine, [Request(x, session=f"s{i}") for i, x in enumerate(xs)])
    for a, b in zip(alone, together):
        assert isinstance(b, torch.Tensor)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert [engine.sessions.get(f"s{i}").samples for i in range(4)] == [8, 3, 1, 16]


def test_stateful_policies_fall_back_to_per_session_execution(demo_module: torch.nn.Module) -> None:
    xs = _batches([4, 4, 4])
    reference = Engine(demo_module, "unmix-tns")
    expected = [reference.predict(x, session="a") for x in xs]
    engine = Engine(demo_module, "unmix-tns")
    got = predict_many(engine, [Request(x, session="a") for x in xs])
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_a_bad_request_only_fails_itself(demo_module: torch.nn.Module) -> None:
    good = _batches([4, 4])
    bad = torch.full((2, 1, 28, 28), float("nan"))
    engine = Engine(demo_module, "tbn")
    results = predict_many(engine, [Request(good[0], "a"), Request(bad, "b"), Request(good[1], "c")])
    assert isinstance(results[1], InvalidInput)
    torch.testing.assert_close(results[0], Engine(demo_module, "tbn").predict(good[0]), rtol=0, atol=1e-5)


def test_per_segment_drift_signals(demo_module: torch.nn.Module) -> None:
    clean, shifted = _batches([8, 8])
    shifted = shifted * 0.1 + 0.45
    engine = Engine(demo_module, "tbn")
    predict_many(engine, [Request(clean, "clean"), Request(shifted, "shifted")])
    alone = Engine(demo_module, "tbn")
    alone.predict(shifted, session="shifted")
    got = engine.signals_of(engine.sessions.get("shifted"))["norm_divergence"]
    expected = alone.signals_of(alone.sessions.get("shifted"))["norm_divergence"]
    assert got == pytest.approx(expected, rel=1e-4)
