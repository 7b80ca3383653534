"""ONNX files ttaserve did not write: a torchvision-style ResNet exported by
``torch.onnx.export`` in a user's usual way, and graphs of several opsets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.conftest import make_tiny, randomize_bn
from ttaserve import Engine
from ttaserve.adapters import prepare
from ttaserve.adapters.adanpc import build_source_memory
from ttaserve.handlers.loader import load_model_dir
from ttaserve.handlers.onnx_model import OnnxModel, load_onnx

TOL = 1e-4


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3-BN-ReLU-conv3x3-BN plus a downsampling shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ShortcutFirst(BasicBlock):
    """Runs its shortcut's BatchNorm before its own: execution order != module order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout (7x7 stem, max-pool, layer1-4, avgpool, fc), narrow."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 24, 32), num_classes: int = 5,
                 block: type[BasicBlock] = BasicBlock) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = widths[0]
        for i, width in enumerate(widths):
            setattr(self, f"layer{i + 1}", nn.Sequential(block(c_in, width, 1 if i == 0 else 2)))
            c_in = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _export(module: nn.Module, path: Path, example: torch.Tensor, **options: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["image"],
                          output_names=["scores"], dynamic_axes={"image": {0: "n"}, "scores": {0: "n"}},
                          **options)  # type: ignore[arg-type]


def _stream(shape: tuple[int, ...], count: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(*shape, generator=gen) * (1.0 - 0.2 * i) for i in range(count)]


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    module = randomize_bn(ResNet())
    directory = tmp_path_factory.mktemp("resnet")
    # A user's usual export; PRESERVE (eval) keeps BatchNormalization as do_constant_folding=False does.
    _export(module, directory / "resnet.onnx", torch.rand(2, 3, 32, 32), opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE)
    source = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    memory = build_source_memory(prepare(module), source, torch.arange(64) % 5)
    save_file(memory, str(directory / "memory.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "onnx": "resnet.onnx",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 5]}],
        "artifacts": {"adanpc.memory": "memory.safetensors"},
    }))
    return module, directory


@pytest.mark.parametrize("policy,params", [("source", {}), ("tbn", {}), ("alpha-bn", {"alpha": 0.3}),
                                           ("unmix-tns", {"K": 16}), ("adanpc", {"k": 8, "beta": 0.0}),
                                           ("graded-bn", {"prior_first": 1.0, "momentum": 0.05})])
def test_torch_onnx_export_of_a_resnet_adapts_like_torch(resnet_dir: tuple[nn.Module, Path],
                                                         policy: str, params: dict) -> None:
    module, directory = resnet_dir
    loaded = load_model_dir(directory)
    assert isinstance(loaded.model, OnnxModel) and loaded.spec.platform == "onnxruntime_onnx"
    model = loaded.model
    assert len(model.bn_layers) == 12 and model.num_classes == 5
    assert model.bn_layers[0].layer_name == "bn1" and model.bn_layers[-1].layer_name == "layer4.0.downsample.1"
    module.ttaserve_artifacts = {"adanpc.memory": model.artifacts["adanpc.memory"]}  # type: ignore[assignment]
    on_torch, on_onnx = Engine(module, policy, **params), Engine(model, policy, **params)
    for x in _stream((8, 3, 32, 32), 3):
        torch.testing.assert_close(on_onnx.predict(x, session="s"), on_torch.predict(x, session="s"),
                                   rtol=0, atol=TOL)
    for key, value in on_torch.sessions.get("s").state.items():
        torch.testing.assert_close(on_onnx.sessions.get("s").state[key], value, rtol=0, atol=TOL)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("policy", ["tbn", "unmix-tns"])
def test_opsets_with_axes_as_attributes_or_inputs(tmp_path: Path, opset: int, policy: str) -> None:
    module = make_tiny()
    _export(module, tmp_path / "tiny.onnx", torch.rand(2, 1, 12, 12), opset_version=opset,
            do_constant_folding=False)
    model = load_onnx(tmp_path / "tiny.onnx")
    assert model.info.opset == opset and len(model.bn_layers) == 2
    params = {"K": 4} if policy == "unmix-tns" else {}
    on_torch, on_onnx = Engine(module, policy, **params), Engine(model, policy, **params)
    for x in _stream((4, 1, 12, 12), 3):
        torch.testing.assert_close(on_onnx.predict(x, session="s"), on_torch.predict(x, session="s"),
                                   rtol=0, atol=TOL)


def test_export_onnx_numbers_layers_in_module_order(tmp_path: Path) -> None:
    """A graph whose BatchNorms run in another order than the module defines them: the
    order recorded by export-onnx keeps UnMix-TNS's seeded components on the same layers."""
    from ttaserve.handlers.onnx_export import export_onnx
    from ttaserve.handlers.spec import ModelSpec, TensorSpec

    torch.manual_seed(1)
    module = randomize_bn(ResNet(block=ShortcutFirst))
    spec = ModelSpec("r", (TensorSpec("image", "FP32", (-1, 3, 32, 32)),), (TensorSpec("scores", "FP32", (-1, 5)),))
    model = export_onnx(module, spec, tmp_path / "r.onnx")
    torch_names = [n for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert [layer.layer_name for layer in model.bn_layers] == torch_names
    on_torch, on_onnx = Engine(module, "unmix-tns", K=8), Engine(model, "unmix-tns", K=8)
    for x in _stream((4, 3, 32, 32), 3):
        torch.testing.assert_close(on_onnx.predict(x, session="s"), on_torch.predict(x, session="s"),
                                   rtol=0, atol=TOL)
