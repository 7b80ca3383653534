"""Poisoning: outlier batches cannot move a session's state (ttaserve/outliers.py), and a
session's data never reaches another session."""

from __future__ import annotations

import pytest
import torch

import ttaserve.models
from ttaserve import Engine
from ttaserve.adapters import create_adapter, policy_names, prepare
from ttaserve.bench.corruptions import corrupt
from ttaserve.data import load_split
from ttaserve.outliers import OutlierConfig, outlier_reason


@pytest.fixture(scope="module")
def demo_model():  # type: ignore[no-untyped-def]
    return prepare(ttaserve.models.demo())


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    return load_split("test")[0][:96]


def stateful(model) -> list[str]:  # type: ignore[no-untyped-def]
    return [p for p in policy_names() if len(create_adapter(p, model).init_state(model))]


GATE = OutlierConfig(max_divergence=15.0)  # the server's default (--outlier-divergence)
OUTLIERS = {
    "zeros": torch.zeros(8, 1, 28, 28),
    "ones": torch.ones(8, 1, 28, 28),
    "grey": torch.full((8, 1, 28, 28), 0.5),
}


def _state(engine: Engine, sid: object) -> dict[str, torch.Tensor]:
    return engine.sessions.get(sid).state.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_constant_and_extreme_batches_are_flagged(demo_model, clean: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    config = GATE
    engine = Engine(demo_model, "tent", outliers=GATE)
    for name, x in OUTLIERS.items():
        engine.predict(clean[:8], session=name)
        before = _state(engine, name)
        engine.predict(x, session=name)
        assert engine.sessions.get(name).skipped == {"constant": 1}, name
        assert _same(before, _state(engine, name))
    # Without the constant rule, the same batches still fail the divergence rule.
    loose = Engine(demo_model, "tent", outliers=OutlierConfig(max_divergence=15.0, max_constant_fraction=1.0))
    loose.predict(OUTLIERS["zeros"], session=1)
    assert loose.sessions.get(1).skipped == {"divergence": 1}
    assert outlier_reason(clean[:16], [], config) is None


@pytest.mark.parametrize("name", ["contrast", "fog", "gaussian_noise", "motion_blur"])
def test_real_corruptions_still_adapt(demo_model, clean: torch.Tensor, name: str) -> None:  # type: ignore[no-untyped-def]
    """The gate must not switch adaptation off for the shifts it exists for (severity 5)."""
    engine = Engine(demo_model, "unmix-tns", outliers=GATE)
    engine.predict(clean[:16], session=1)
    before = _state(engine, 1)
    engine.predict(corrupt(clean[32:64], name, 5), session=1)
    assert not engine.sessions.get(1).skipped
    assert not _same(before, _state(engine, 1))


def test_outlier_batch_moves_no_stateful_policy(demo_model, clean: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    """Bound: a flagged batch moves the state by exactly zero, for every stateful policy
    (so every later prediction is that of a session that never saw it), and its own
    prediction is the one adapt=False gives."""
    for policy in stateful(demo_model):
        engine = Engine(demo_model, policy, outliers=GATE)
        engine.predict(clean[:8], session=1)
        before, guard = _state(engine, 1), engine.sessions.get(1).guard.state.state_dict()
        expected = engine.predict(OUTLIERS["ones"], session=1, adapt=False)
        got = engine.predict(OUTLIERS["ones"], session=1)
        assert torch.equal(got, expected), policy
        assert _same(before, _state(engine, 1)), policy
        assert _same(guard, engine.sessions.get(1).guard.state.state_dict()), policy
        assert engine.sessions.get(1).skipped["constant"] == 1


def test_gate_counts_in_the_monitor(demo_model, clean: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    reports = []
    engine = Engine(demo_model, "tent", monitor=reports.append)
    engine.predict(clean[:16], session=1)
    engine.predict(OUTLIERS["zeros"], session=1)
    engine.predict(OUTLIERS["zeros"], session=1, adapt=False)  # nothing to skip
    assert [r.skipped for r in reports] == [None, "constant", None]


def test_disabled_gate_lets_outliers_update(demo_model, clean: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(demo_model, "tent", outliers=OutlierConfig(enabled=False))
    engine.predict(clean[:16], session=1)
    before = _state(engine, 1)
    engine.predict(OUTLIERS["ones"], session=1)
    assert not engine.sessions.get(1).skipped and not _same(before, _state(engine, 1))


def test_a_malicious_session_changes_no_bit_of_another(demo_model, clean: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    """Even with the gate off, extreme batches in one session leave every other session's
    outputs bit-identical (per policy, interleaved vs alone)."""
    attacks = [OUTLIERS["ones"], torch.rand(8, 1, 28, 28).round()]
    for policy in stateful(demo_model):
        alone = Engine(demo_model, policy)
        mixed = Engine(demo_model, policy, outliers=OutlierConfig(enabled=False))
        batches = [clean[i:i + 8] for i in range(0, 16, 8)]
        want = [alone.predict(x, session="victim") for x in batches]
        got = []
        for x, attack in zip(batches, attacks):
            mixed.predict(attack, session="attacker")
            got.append(mixed.predict(x, session="victim"))
        assert all(torch.equal(a, b) for a, b in zip(want, got)), policy
