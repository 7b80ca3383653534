"""Models beyond the demo: a Python factory with safetensors weights, and a .pt2 program."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ttaserve import Engine
from ttaserve.handlers.loader import ModelConfigError, load_repository
from ttaserve.models import demo, weights_path

SPEC = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28], "range": [0, 1]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}


def _write(directory: Path, config: dict) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))


def test_factory_and_program_models_match_the_demo(tmp_path: Path) -> None:
    _write(tmp_path / "fashion", {**SPEC, "factory": "ttaserve.models.resnet:DemoResNet",
                                  "weights": weights_path("expert"), "policy": "tbn"})
    program = torch.export.export(demo(), (torch.rand(2, 1, 28, 28),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=512)}})
    _write(tmp_path / "exported", {**SPEC, "program": "model.pt2"})
    torch.export.save(program, str(tmp_path / "exported" / "model.pt2"))

    loaded = {m.spec.name: m for m in load_repository(tmp_path)}
    assert loaded["fashion"].policy == "tbn"
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    reference = Engine(demo(), "tbn").predict(x)
    for name in ("fashion", "exported"):
        model = loaded[name].model
        assert len(model.bn_layers) == 11 and model.num_classes == 10
        assert torch.equal(Engine(model, "tbn").predict(x), reference)
        features, _ = model.features_and_logits(x)
        assert features.shape == (6, 64)


def test_channels_last_is_the_cpu_default_and_can_be_turned_off(tmp_path: Path) -> None:
    base = {**SPEC, "factory": "ttaserve.models.resnet:DemoResNet", "weights": weights_path("expert")}
    _write(tmp_path / "nhwc", base)
    _write(tmp_path / "nchw", {**base, "channels_last": False})
    loaded = {m.spec.name: m.model for m in load_repository(tmp_path)}
    conv = "stages.0.conv1.weight"  # 16 -> 16 channels: the layouts differ
    assert loaded["nhwc"].module.state_dict()[conv].is_contiguous(memory_format=torch.channels_last)
    assert loaded["nchw"].module.state_dict()[conv].is_contiguous()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original = demo()(x)
        assert torch.equal(loaded["nchw"](x), original)  # the original layout: bit for bit
        torch.testing.assert_close(loaded["nhwc"](x), original, rtol=0, atol=1e-5)
    # by default only a model on the CPU (a GPU's fused kernels walk NCHW rows)
    from ttaserve.adapters.model import prepare

    off_cpu = prepare(demo().to("meta")).module.state_dict()[conv]
    assert off_cpu.is_contiguous() and not off_cpu.is_contiguous(memory_format=torch.channels_last)
    assert prepare(demo()).module.state_dict()[conv].is_contiguous(memory_format=torch.channels_last)
    _write(tmp_path / "bad" / "m", {**base, "channels_last": "yes"})
    with pytest.raises(ModelConfigError, match="'channels_last' must be true or false"):
        load_repository(tmp_path / "bad")


def test_bad_configs_say_what_is_wrong(tmp_path: Path) -> None:
    _write(tmp_path / "a", {**SPEC})
    with pytest.raises(ModelConfigError, match="needs 'factory'"):
        load_repository(tmp_path)
    with pytest.raises(ModelConfigError, match="no <model>/config.json"):
        load_repository(tmp_path / "a")
    _write(tmp_path / "b" / "m", {**SPEC, "factory": "nodots"})
    with pytest.raises(ModelConfigError, match="package.module:function"):
        load_repository(tmp_path / "b")
