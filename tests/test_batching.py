"""Cross-session batching (Engine.predict_many) gives each request what it would get alone."""

from __future__ import annotations

import pytest
import torch

from ttaserve import Engine
from ttaserve.adapters.safety import SafetyConfig
from ttaserve.batching import Prediction, Request
from ttaserve.errors import InvalidInput

SHARING = ["source", "tbn", "alpha-bn", "unmix-tns", "graded-bn", "adanpc"]


def _batches(sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 1, 28, 28, generator=gen) * (0.3 + 0.2 * i) for i, n in enumerate(sizes)]


def _logits(result: object) -> torch.Tensor:
    assert isinstance(result, Prediction), result
    return result.logits


@pytest.mark.parametrize("policy", SHARING)
def test_shared_forward_equals_each_session_alone_over_a_stream(demo_module: torch.nn.Module, policy: str) -> None:
    """Four sessions, five rounds each: batched together, every request gets (within 1e-5)
    what its session alone gets, and each session's state ends the same."""
    sizes = [8, 3, 1, 16]
    alone = Engine(demo_module, policy)
    together = Engine(demo_module, policy)
    for step in range(5):
        xs = _batches(sizes, seed=step)
        expected = [alone.predict(x, session=f"s{i}") for i, x in enumerate(xs)]
        got = together.predict_many([Request(x, session=f"s{i}") for i, x in enumerate(xs)])
        for e, g in zip(expected, got):
            torch.testing.assert_close(_logits(g), e, rtol=0, atol=1e-5)
            assert g.policy == together.default.name  # type: ignore[union-attr]
    for i in range(4):
        a, b = alone.sessions.get(f"s{i}"), together.sessions.get(f"s{i}")
        assert (a.batches, a.samples) == (b.batches, b.samples) == (5, 5 * sizes[i])
        for key, value in a.state.items():
            torch.testing.assert_close(b.state[key], value, rtol=0, atol=1e-5)


def test_sessions_of_different_policies_share_one_pass(demo_module: torch.nn.Module) -> None:
    policies = ["graded-bn", "unmix-tns", "adanpc", "alpha-bn", "source", "tbn"]
    xs = _batches([4, 6, 7, 2, 5, 3])
    alone = Engine(demo_module)
    expected = [alone.predict(x, session=f"s{i}", policy=p) for i, (p, x) in enumerate(zip(policies, xs))]
    engine = Engine(demo_module)
    got = engine.predict_many([Request(x, f"s{i}", policy=p) for i, (p, x) in enumerate(zip(policies, xs))])
    for p, e, g in zip(policies, expected, got):
        torch.testing.assert_close(_logits(g), e, rtol=0, atol=1e-5)
        assert g.policy == Engine(demo_module, p).default.name  # type: ignore[union-attr]


def test_one_pass_and_one_source_memory_search_for_a_mixed_round(demo_module: torch.nn.Module,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Six sessions, two each of alpha-bn, unmix-tns and adanpc: one forward pass in all,
    and the shared 60k-entry source memory searched once for both adanpc sessions."""
    import ttaserve.adapters.adanpc as adanpc

    engine = Engine(demo_module, safety=SafetyConfig(enabled=False))
    policies = ["alpha-bn", "unmix-tns", "adanpc"] * 2
    warm = [Request(x, f"s{i}", policy=p) for i, (p, x) in enumerate(zip(policies, _batches([8] * 6, seed=1)))]
    engine.predict_many(warm)  # sessions open, adanpc test memories begin to fill
    passes, searched = [], []
    module_forward = engine.model.module.forward
    monkeypatch.setattr(engine.model.module, "forward", lambda x: passes.append(x.shape[0]) or module_forward(x))
    source_keys = adanpc.source_memory(engine.model)[0]
    top_k = adanpc._top_k
    monkeypatch.setattr(adanpc, "_top_k", lambda q, m, k: searched.append((q.shape[0], m[0] is source_keys)) or top_k(q, m, k))
    results = engine.predict_many([Request(x, f"s{i}") for i, x in enumerate(_batches([8] * 6, seed=2))])
    assert all(isinstance(r, Prediction) for r in results)
    assert passes == [48]
    assert [rows for rows, is_source in searched if is_source] == [16]  # both adanpc sessions at once
    assert all(rows == 8 for rows, is_source in searched if not is_source)  # each session's own memory


def test_an_unsequenced_request_gets_the_policy_it_names(demo_module: torch.nn.Module) -> None:
    """A request without a sequence id naming tta_policy=tbn is answered by tbn, alone or
    batched, and the result says so (it used to get the default policy's logits)."""
    x, other = _batches([8, 4])
    expected = Engine(demo_module, "tbn").predict(x)
    engine = Engine(demo_module, "source")
    for requests in ([Request(x, policy="tbn")], [Request(x, policy="tbn"), Request(other, "s")]):
        first = engine.predict_many(requests)[0]
        torch.testing.assert_close(_logits(first), expected, rtol=0, atol=1e-5)
        assert first.policy == "alpha-bn"  # type: ignore[union-attr]  # tbn is alpha-bn with alpha=0
    assert not torch.allclose(expected, engine.predict(x), atol=1e-3)


def test_two_requests_of_one_session_run_in_order(demo_module: torch.nn.Module) -> None:
    xs = _batches([4, 4, 4])
    reference = Engine(demo_module, "unmix-tns")
    expected = [reference.predict(x, session="a") for x in xs]
    engine = Engine(demo_module, "unmix-tns")
    got = engine.predict_many([Request(x, session="a") for x in xs])
    for g, e in zip(got, expected):
        torch.testing.assert_close(_logits(g), e, rtol=0, atol=1e-5)


def test_policies_that_cannot_share_run_alone(demo_module: torch.nn.Module) -> None:
    xs = _batches([4, 4])
    expected = [Engine(demo_module, "tent").predict(x, session=f"s{i}") for i, x in enumerate(xs)]
    got = Engine(demo_module, "tent").predict_many([Request(x, f"s{i}") for i, x in enumerate(xs)])
    assert all(torch.equal(_logits(g), e) for g, e in zip(got, expected))


def test_a_bad_request_only_fails_itself(demo_module: torch.nn.Module) -> None:
    good = _batches([4, 4])
    bad = torch.full((2, 1, 28, 28), float("nan"))
    engine = Engine(demo_module, "tbn")
    results = engine.predict_many([Request(good[0], "a"), Request(bad, "b"), Request(good[1], "c")])
    assert isinstance(results[1], InvalidInput)
    assert engine.sessions.get("b") is None
    torch.testing.assert_close(_logits(results[0]), Engine(demo_module, "tbn").predict(good[0]), rtol=0, atol=1e-5)


def test_per_segment_drift_signals(demo_module: torch.nn.Module) -> None:
    clean, shifted = _batches([8, 8])
    shifted = shifted * 0.1 + 0.45
    engine = Engine(demo_module, "tbn")
    engine.predict_many([Request(clean, "clean"), Request(shifted, "shifted")])
    alone = Engine(demo_module, "tbn")
    alone.predict(shifted, session="shifted")
    got = engine.signals_of(engine.sessions.get("shifted"))["norm_divergence"]
    expected = alone.signals_of(alone.sessions.get("shifted"))["norm_divergence"]
    assert got == pytest.approx(expected, rel=1e-4)


def test_the_safety_net_runs_per_session_in_a_shared_pass(demo_module: torch.nn.Module) -> None:
    """A hair-trigger safety net: every session falls back at the same batch batched or
    alone, is then answered by source (and says so), and counts the same fallbacks."""
    strict = SafetyConfig(min_evidence=4, entropy_margin=-1.0, confident_entropy=1.0)
    alone = Engine(demo_module, "graded-bn", safety=strict)
    together = Engine(demo_module, "graded-bn", safety=strict)
    for step in range(4):
        xs = _batches([16, 8], seed=step)
        expected = [alone.run(Request(x, f"s{i}")) for i, x in enumerate(xs)]
        got = together.predict_many([Request(x, f"s{i}") for i, x in enumerate(xs)])
        for e, g in zip(expected, got):
            torch.testing.assert_close(_logits(g), e.logits, rtol=0, atol=1e-5)
            assert g.policy == e.policy  # type: ignore[union-attr]
    for i in range(2):
        a, b = alone.sessions.get(f"s{i}"), together.sessions.get(f"s{i}")
        assert a.fallbacks == b.fallbacks and sum(a.fallbacks.values()) > 0
    assert {e.policy for e in expected} == {"source"}


def test_a_broken_session_in_a_shared_pass_is_reset_alone(demo_module: torch.nn.Module) -> None:
    """A session whose state turned non-finite is reset and answered from a fresh state;
    the session batched with it is untouched."""
    x, y = _batches([8, 8])
    engine = Engine(demo_module, "graded-bn")
    engine.predict_many([Request(x, "broken"), Request(y, "fine")])
    broken = engine.sessions.get("broken")
    broken.state["mean.0"] = torch.full_like(broken.state["mean.0"], float("nan"))
    got = engine.predict_many([Request(x, "broken"), Request(y, "fine")])
    assert broken.resets["non_finite"] == 1 and bool(torch.isfinite(_logits(got[0])).all())
    torch.testing.assert_close(_logits(got[0]), Engine(demo_module, "graded-bn").predict(x, session="b"),
                               rtol=0, atol=1e-5)
    alone = Engine(demo_module, "graded-bn")
    alone.predict(y, session="fine")
    torch.testing.assert_close(_logits(got[1]), alone.predict(y, session="fine"), rtol=0, atol=1e-5)


def test_a_request_the_shared_pass_cannot_take_fails_alone(demo_module: torch.nn.Module) -> None:
    """Inputs that cannot be batched together (here a wrong channel count) make the round
    run request by request: only the bad one fails, and a failing request that asked to
    end its sequence ends it."""
    good = _batches([4])[0]
    bad = torch.rand(4, 3, 28, 28)
    engine = Engine(demo_module, "graded-bn")
    results = engine.predict_many([Request(good, "a"), Request(bad, "b", end=True)])
    assert isinstance(results[1], Exception) and engine.sessions.get("b") is None
    torch.testing.assert_close(_logits(results[0]), Engine(demo_module, "graded-bn").predict(good, session="a"),
                               rtol=0, atol=1e-5)


def test_a_monitor_without_drift_signals_sees_every_segment(demo_module: torch.nn.Module) -> None:
    """Drift signals off but a monitor on (nothing observed in the pass): every request of a
    shared pass is answered and reported, with no per-layer divergence to report."""
    from ttaserve.outliers import OutlierConfig

    reports: list = []
    engine = Engine(demo_module, "alpha-bn", track_drift=False, monitor=reports.append,
                    outliers=OutlierConfig(enabled=False))
    results = engine.predict_many([Request(x, f"s{i}") for i, x in enumerate(_batches([4, 3, 2]))])
    assert all(isinstance(r, Prediction) for r in results)
    assert len(reports) == 3
    assert engine.layer_divergence_of(engine.sessions.get("s2")) == {}
