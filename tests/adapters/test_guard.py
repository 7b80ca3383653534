"""Collapse guard: the signal rule on its own, and resets of engine sessions."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import make_tiny
from ttaserve.adapters.guard import CollapseGuard, GuardConfig, normalized_entropy
from ttaserve.adapters.safety import SafetyConfig
from ttaserve.engine import Engine
from ttaserve.outliers import OutlierConfig

C = 10


def confident(labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Logits predicting ``labels`` with a margin (larger margin, lower entropy)."""
    return torch.nn.functional.one_hot(labels, C).float() * margin


def feed(guard: CollapseGuard, batches: list[torch.Tensor]) -> list[str | None]:
    return [guard.observe(b) for b in batches]


# -- the rule ---------------------------------------------------------------------------
def test_config_validation() -> None:
    for bad in ({"entropy_floor": -0.1}, {"ema_decay": 1.0}, {"window": 0}, {"top_fraction": 0.0}):
        with pytest.raises(ValueError):
            GuardConfig(**bad)  # type: ignore[arg-type]


def test_normalized_entropy_scale() -> None:
    assert float(normalized_entropy(torch.zeros(4, C))) == pytest.approx(1.0)
    assert float(normalized_entropy(confident(torch.zeros(4, dtype=torch.long), 50.0))) < 1e-12
    assert float(normalized_entropy(torch.zeros(4, 1))) == 0.0


def test_collapse_needs_full_window() -> None:
    guard = CollapseGuard(GuardConfig(window=64))
    batch = confident(torch.zeros(16, dtype=torch.long), 30.0)
    assert feed(guard, [batch] * 4) == [None, None, None, "collapse"]
    assert guard.signals()["distinct_classes"] == 1.0 and guard.signals()["top_fraction"] == 1.0


def test_low_entropy_but_diverse_is_healthy() -> None:
    """Confident predictions spread over classes (i.i.d., or class blocks shorter than the
    window as in a label-sorted stream of short blocks) never trigger."""
    guard = CollapseGuard(GuardConfig(window=64))
    iid = [confident(torch.arange(16) % C, 30.0) for _ in range(8)]
    blocks = [confident(torch.full((16,), k // 2, dtype=torch.long), 30.0) for k in range(20)]
    assert feed(guard, iid + blocks) == [None] * 28


def test_sorted_confident_stream_above_floor_is_not_reset() -> None:
    """A label-sorted stream fills the window with one class; a model that is confident
    the way a healthy one is (entropy above the floor) is left alone."""
    guard = CollapseGuard(GuardConfig(window=64))
    healthy = confident(torch.zeros(16, dtype=torch.long), 7.0)  # normalized entropy ~0.02
    assert float(normalized_entropy(healthy)) > guard.config.entropy_floor
    assert feed(guard, [healthy] * 12) == [None] * 12


def test_uncertain_single_class_is_not_collapse() -> None:
    guard = CollapseGuard(GuardConfig(window=32))
    assert feed(guard, [confident(torch.zeros(16, dtype=torch.long), 1.0)] * 6) == [None] * 6


def test_single_class_model_never_collapses() -> None:
    guard = CollapseGuard(GuardConfig(window=8))
    assert feed(guard, [torch.full((8, 1), 3.0)] * 4) == [None] * 4


def test_entropy_ema_smooths_one_odd_batch() -> None:
    guard = CollapseGuard(GuardConfig(window=16, ema_decay=0.9))
    uniform = torch.zeros(16, C)
    peaked = confident(torch.zeros(16, dtype=torch.long), 50.0)
    assert feed(guard, [uniform, peaked]) == [None, None]
    assert float(guard.state["entropy_ema"]) == pytest.approx(0.9, abs=1e-6)


def test_non_finite_logits_and_states() -> None:
    guard = CollapseGuard()
    assert guard.observe(torch.tensor([[0.0, float("nan")]])) == "non_finite"
    assert guard.observe(torch.zeros(2, 3), {"w": torch.tensor([1.0, float("inf")])}) == "non_finite"
    guard.state["entropy_ema"] = torch.tensor(float("nan"))
    assert guard.observe(torch.zeros(2, 3)) == "non_finite"


def test_disabled_never_reports() -> None:
    guard = CollapseGuard(GuardConfig(enabled=False, window=16))
    batch = confident(torch.zeros(16, dtype=torch.long), 30.0)
    assert feed(guard, [batch] * 4 + [torch.full((2, C), math.nan)]) == [None] * 5


def test_state_round_trip_and_reset() -> None:
    guard, twin = CollapseGuard(GuardConfig(window=48)), CollapseGuard(GuardConfig(window=48))
    batch = confident(torch.zeros(16, dtype=torch.long), 30.0)
    feed(guard, [batch] * 2)
    twin.state.load_state_dict(guard.state.state_dict())
    assert guard.observe(batch) == twin.observe(batch) == "collapse"
    guard.reset()
    assert feed(guard, [batch] * 3) == [None, None, "collapse"]


def test_batch_larger_than_window() -> None:
    guard = CollapseGuard(GuardConfig(window=8))
    labels = torch.cat([torch.arange(C), torch.zeros(8, dtype=torch.long)])
    assert guard.observe(confident(labels, 30.0)) == "collapse"  # the last 8 are all class 0


# -- engine integration -----------------------------------------------------------------
# Constant images would be refused as outliers (ttaserve/outliers.py); here they are the
# point, so the poisoning gate is off.
# The safety net would switch such a session to source before the guard sees the collapse
# (adapters/safety.py, tested in test_safety.py); here the guard alone is under test.
COLLAPSING = {"policy": "tent", "lr": 3.0, "outliers": OutlierConfig(enabled=False),
              "safety": SafetyConfig(enabled=False)}
# A short window and memory so that the tiny streams below are long enough to judge.
SMALL_WINDOW = GuardConfig(window=32, ema_decay=0.5)


def constant_batches(n: int) -> list[torch.Tensor]:
    """Constant images: every sample of a batch gets the same prediction, and tent at a
    high learning rate drives its entropy to zero."""
    return [torch.full((16, 1, 12, 12), 0.3 + 0.01 * i) for i in range(n)]


def random_batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(16, 1, 12, 12, generator=g) for _ in range(n)]


def test_collapsing_tent_session_is_reset() -> None:
    engine = Engine(make_tiny(num_classes=4), guard=SMALL_WINDOW, **COLLAPSING)
    fresh = engine.adapter(engine.default).init_state(engine.model).state_dict()
    for batch in constant_batches(30):
        engine.predict(batch, session="s")
        session = engine.sessions.get("s")
        assert session is not None
        if session.resets["collapse"]:
            break
    assert session.resets == {"collapse": 1}
    for key, value in fresh.items():  # reset to exactly the initial state
        assert torch.equal(session.state[key], value)
    assert int(session.guard.state["seen"]) == 0  # type: ignore[union-attr]


def test_guard_disabled_never_resets() -> None:
    engine = Engine(make_tiny(num_classes=4), guard=GuardConfig(enabled=False, window=32), **COLLAPSING)
    for batch in constant_batches(20):
        engine.predict(batch, session="s")
    session = engine.sessions.get("s")
    assert session is not None and session.guard is None and not session.resets
    assert float(session.state["entropy"]) < 1e-3  # it did collapse


def test_healthy_stream_is_never_reset_and_output_unchanged() -> None:
    guarded = Engine(make_tiny(num_classes=4), policy="tent", guard=SMALL_WINDOW)
    unguarded = Engine(make_tiny(num_classes=4), policy="tent", guard=GuardConfig(enabled=False))
    for batch in random_batches(20):
        assert torch.equal(guarded.predict(batch, session="s"), unguarded.predict(batch, session="s"))
    session = guarded.sessions.get("s")
    assert session is not None and not session.resets
    assert session.guard is not None and int(session.guard.state["seen"]) == 320


def test_stateless_policy_is_not_watched() -> None:
    engine = Engine(make_tiny(), policy="tbn")
    engine.predict(random_batches(1)[0], session="s")
    session = engine.sessions.get("s")
    assert session is not None and session.guard is None


@pytest.mark.parametrize("key", ["bn0.weight", "bn1.bias"])
def test_nan_in_affine_state_resets_and_output_is_finite(key: str) -> None:
    engine = Engine(make_tiny(), policy="tent")
    batch = random_batches(1)[0]
    expected = engine.predict(batch, session="s")  # fresh state: what the retry must give
    session = engine.sessions.get("s")
    assert session is not None
    session.state[key] = torch.full_like(session.state[key], math.nan)
    out = engine.predict(batch, session="s")
    assert torch.isfinite(out).all() and torch.equal(out, expected)
    assert session.resets == {"non_finite": 1}
    assert all(torch.isfinite(t).all() for t in session.state.values())


def test_nan_in_moment_state_resets_after_finite_output() -> None:
    """A broken Adam moment leaves this batch's logits finite (they precede the update)
    but poisons the update; the state is reset before the next batch."""
    engine = Engine(make_tiny(), policy="tent")
    batch = random_batches(1)[0]
    engine.predict(batch, session="s")
    session = engine.sessions.get("s")
    assert session is not None
    session.state["bn0.weight.exp_avg_sq"][0] = math.nan
    assert torch.isfinite(engine.predict(batch, session="s")).all()
    assert session.resets == {"non_finite": 1}
    assert all(torch.isfinite(t).all() for t in session.state.values())


def test_nan_state_with_adapt_false() -> None:
    engine = Engine(make_tiny(), policy="tent")
    batch = random_batches(1)[0]
    engine.predict(batch, session="s")
    session = engine.sessions.get("s")
    assert session is not None
    session.state["bn1.weight"] = torch.full_like(session.state["bn1.weight"], math.inf)
    assert torch.isfinite(engine.predict(batch, session="s", adapt=False)).all()
    assert session.resets == {"non_finite": 1}


def test_request_reset_clears_guard_signals() -> None:
    engine = Engine(make_tiny(), policy="tent")
    for batch in random_batches(2):
        engine.predict(batch, session="s")
    engine.reset("s")
    session = engine.sessions.get("s")
    assert session is not None and session.guard is not None
    assert int(session.guard.state["seen"]) == 0 and session.resets == {"request": 1}
