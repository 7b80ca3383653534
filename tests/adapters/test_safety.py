"""Safety net: sampling schedule, signals, verdicts, and the engine's fallback to source."""

from __future__ import annotations

import pytest
import torch

from ttaserve import Engine
from ttaserve.adapters import prepare
from ttaserve.adapters.safety import SafetyConfig, SafetyNet


def _checks(net: SafetyNet, batch: int, batches: int) -> list[int]:
    return [net.samples_to_check(batch) for _ in range(batches)]


def test_schedule_checks_a_share_of_the_samples_in_forwards_of_a_few() -> None:
    net = SafetyNet(SafetyConfig(), 10)
    assert _checks(net, 64, 4) == [16, 16, 16, 16]  # warm-up: a quarter of the first 256
    assert _checks(net, 64, 3) == [4, 4, 4]  # then 1/16
    small = SafetyNet(SafetyConfig(), 10)
    assert _checks(small, 16, 16) == [4] * 16  # warm-up 4 a batch; then 1/16 = 1 a batch, ...
    assert _checks(small, 16, 8) == [0, 0, 0, 4, 0, 0, 0, 4]  # ... gathered into forwards of 4
    single = SafetyNet(SafetyConfig(), 10)
    assert _checks(single, 1, 8) == [0, 0, 0, 1, 0, 0, 0, 1]
    off = SafetyNet(SafetyConfig(check_fraction=0.0, warmup_fraction=0.0), 10)
    assert _checks(off, 64, 10) == [0] * 10


def _logits(classes: list[int], sharpness: float, num_classes: int = 10) -> torch.Tensor:
    out = torch.zeros(len(classes), num_classes)
    out[torch.arange(len(classes)), torch.tensor(classes)] = sharpness
    return out


def test_confident_source_and_less_confident_adaptation_falls_back() -> None:
    net = SafetyNet(SafetyConfig(), 10)
    classes = [0, 1, 2, 3] * 4
    assert net.observe(_logits(classes, 3.0), _logits(classes, 12.0)) is None  # 16 < min_evidence
    assert net.observe(_logits(classes, 3.0), _logits(classes, 12.0)) == "entropy"


def test_an_uncertain_source_model_never_triggers_the_entropy_rule() -> None:
    """Where the source model is unsure (a real shift), adapting may change and even blur its
    predictions: that is what adapting is for."""
    net = SafetyNet(SafetyConfig(), 10)
    for _ in range(10):
        assert net.observe(_logits([0, 1, 2, 3] * 4, 1.0), _logits([0, 1, 2, 3] * 4, 1.5)) is None


def test_marginal_collapse_falls_back() -> None:
    net = SafetyNet(SafetyConfig(), 10)
    source = _logits([0, 1, 2, 3] * 4, 1.5)  # spread over four classes, unsure
    collapsed = _logits([5] * 16, 9.0)  # everything one class
    assert net.observe(collapsed, source) is None
    assert net.observe(collapsed, source) == "marginal"


def test_agreeing_models_never_fall_back() -> None:
    net = SafetyNet(SafetyConfig(), 10)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(8, 10, generator=g) * 4
        assert net.observe(logits, logits) is None


def test_cooldown_doubles_up_to_its_cap_and_ends() -> None:
    net = SafetyNet(SafetyConfig(cooldown=100, max_cooldown=300), 10)
    lengths = []
    for _ in range(4):
        net.fall_back()
        lengths.append(int(net.state["cooldown"]))
        assert net.falling_back
        while not net.served_from_source(64):
            pass
        assert not net.falling_back
    assert lengths == [100, 200, 300, 300]


def test_settings_parse_with_clear_errors() -> None:
    config = SafetyConfig.from_params({"confident_entropy": "0.3", "enabled": "false", "cooldown": "64"})
    assert (config.confident_entropy, config.enabled, config.cooldown) == (0.3, False, 64)
    with pytest.raises(ValueError, match="unknown safety-net setting"):
        SafetyConfig.from_params({"confident": "1"})
    with pytest.raises(ValueError, match="check_fraction"):
        SafetyConfig(check_fraction=2.0)


# -- engine: real Fashion-MNIST through the demo model -----------------------------------
@pytest.fixture(scope="module")
def fashion() -> tuple[torch.Tensor, torch.Tensor]:
    from ttaserve.data import load_split

    x, y = load_split("test")
    return x[:2000], y[:2000]


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    from ttaserve.models import demo as load

    return prepare(load())


def test_tbn_on_label_sorted_clean_images_falls_back_to_source(demo, fashion) -> None:  # type: ignore[no-untyped-def]
    """Test-batch normalization on one-class batches of clean images makes the confident
    source model unsure: the net switches the session to source, whose answers are then
    exactly the source model's, and the session adapts again after the cooldown."""
    x, y = fashion
    sorted_x = x[torch.argsort(y, stable=True)][:1024]
    engine = Engine(demo, "tbn", safety=SafetyConfig(cooldown=128))
    outputs = [engine.predict(sorted_x[i:i + 32], session="cam") for i in range(0, 1024, 32)]
    session = engine.sessions.get("cam")
    assert session is not None and session.fallbacks["entropy"] >= 1
    assert sum(session.resets.values()) == 0  # a fallback is not counted as a reset
    source = engine.source_logits(sorted_x)
    served_by_source = [torch.equal(o, source[i * 32:(i + 1) * 32]) for i, o in enumerate(outputs)]
    assert sum(served_by_source) >= 4  # a cooldown of 128 samples = 4 batches
    first = served_by_source.index(True)
    assert not all(served_by_source[first:])  # it tried adapting again


def test_graded_bn_on_iid_shifted_images_keeps_adapting(demo, fashion) -> None:  # type: ignore[no-untyped-def]
    from ttaserve.bench.corruptions import corrupt

    x, _ = fashion
    noisy = corrupt(x[:1024], "gaussian_noise", 5, seed=0)
    engine = Engine(demo, "graded-bn")
    for i in range(0, 1024, 64):
        engine.predict(noisy[i:i + 64], session="cam")
    session = engine.sessions.get("cam")
    assert session is not None and not session.fallbacks
    assert float(session.safety.state["checked"]) > 0  # type: ignore[union-attr]


def test_safety_state_round_trips_through_snapshots(demo, fashion) -> None:  # type: ignore[no-untyped-def]
    x, _ = fashion
    engine = Engine(demo, "graded-bn")
    for i in range(0, 256, 32):
        engine.predict(x[i:i + 32], session="a")
    copy = Engine(demo, "graded-bn")
    copy.restore("a", engine.snapshot("a"))
    mine, theirs = engine.sessions.get("a"), copy.sessions.get("a")
    assert mine is not None and theirs is not None
    for key, value in mine.safety.state.items():  # type: ignore[union-attr]
        assert torch.equal(theirs.safety.state[key], value)  # type: ignore[union-attr]
    nxt = x[256:320]
    assert torch.equal(copy.predict(nxt, session="a"), engine.predict(nxt, session="a"))


def test_source_sessions_and_a_disabled_net_are_not_watched(demo) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(demo, "source")
    engine.predict(torch.rand(4, 1, 28, 28), session="s")
    assert engine.sessions.get("s").safety is None  # type: ignore[union-attr]
    off = Engine(demo, "graded-bn", safety=SafetyConfig(enabled=False))
    off.predict(torch.rand(4, 1, 28, 28), session="s")
    assert off.sessions.get("s").safety is None  # type: ignore[union-attr]
