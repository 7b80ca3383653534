"""Writing a torch model as an adaptable ONNX file (``ttaserve export-onnx``).

Adaptable means the BatchNormalization nodes are still in the graph. Both of torch's
exporters fold BatchNorm into the preceding Conv by default in eval mode: the TorchScript
exporter when it constant-folds, the dynamo exporter in its optimization pass. This module
uses the TorchScript exporter (``dynamo=False``) with ``do_constant_folding=False``: it
needs nothing beyond torch and onnx, whereas the dynamo exporter needs ``onnxscript``,
whose current release requires protobuf 7 and ml-dtypes 0.7, which conflict with
tritonclient's pins (protobuf < 7, ml-dtypes <= 0.5.4). A model exported elsewhere is
served too, as long as its BatchNormalization nodes were kept (dynamo: ``optimize=False``).

Every export is checked: the file must hold one adaptable BatchNorm per ``BatchNorm2d`` of
the module, and its logits must match torch's (source and test-batch statistics) to 1e-4.
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttaserve.adapters.model import ModelError, normalizer, prepare
from ttaserve.handlers.spec import ModelSpec

TOLERANCE = 1e-4
DEFAULT_OPSET = 17


def _example(spec: ModelSpec, batch: int = 4) -> torch.Tensor:
    tensor = spec.inputs[0]
    low, high = tensor.value_range or (0.0, 1.0)
    generator = torch.Generator().manual_seed(0)
    return low + (high - low) * torch.rand(batch, *tensor.shape[1:], generator=generator)


def export_onnx(module: nn.Module, spec: ModelSpec, out: str | Path, opset: int = DEFAULT_OPSET) -> Any:
    """Export ``module`` (eval mode) to ``out`` with BatchNormalization kept and a dynamic
    batch dimension; returns the loaded, checked :class:`OnnxModel`."""
    module = module.eval()
    (inp,), (outp,) = spec.inputs, spec.outputs
    options: dict[str, Any] = {"do_constant_folding": False, "opset_version": opset}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (_example(spec, 2),), str(out), input_names=[inp.name],
                          output_names=[outp.name], dynamic_axes={inp.name: {0: "batch"}, outp.name: {0: "batch"}},
                          **options)
    _record_layer_order(module, out)
    return check_export(module, spec, out)


def _record_layer_order(module: nn.Module, path: str | Path) -> None:
    """Store the torch order of the BatchNorm layers in the file (see LAYER_ORDER_KEY)."""
    import onnx

    from ttaserve.handlers.onnx_graph import LAYER_ORDER_KEY

    model = onnx.load(str(path))
    names = [name for name, m in module.named_modules() if type(m) is nn.BatchNorm2d]
    props = {prop.key: prop.value for prop in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, LAYER_ORDER_KEY: json.dumps(names)})
    onnx.save(model, str(path))


def check_export(module: nn.Module, spec: ModelSpec, path: str | Path) -> Any:
    """Load ``path`` and compare it with ``module``; raises ModelError on a mismatch."""
    from ttaserve.handlers.onnx_model import load_onnx

    model = load_onnx(path)
    expected = sum(type(m) is nn.BatchNorm2d for m in module.modules())
    if len(model.bn_layers) != expected:
        raise ModelError(f"{path}: {len(model.bn_layers)} adaptable BatchNorm layers in the ONNX graph, "
                         f"{expected} BatchNorm2d in the module (some were folded or not exported)")
    x = _example(spec)
    reference = prepare(module)
    from ttaserve.adapters.alpha_bn import alpha_bn_norm

    for hook in (None, alpha_bn_norm(0.0)):
        with torch.no_grad(), normalizer(hook):
            gap = float((model(x) - reference(x)).abs().max())
        if not gap <= TOLERANCE:
            raise ModelError(f"{path}: ONNX Runtime logits differ from torch's by {gap:.2e} (> {TOLERANCE})")
    return model


def write_entry(directory: Path, onnx_name: str, spec: ModelSpec, features: str | None,
                extra: dict[str, Any], artifacts: dict[str, Path]) -> Path:
    """A model repository entry beside the ONNX file: config.json, with the artifacts
    ONNX models can use copied next to it."""
    config: dict[str, Any] = {
        "onnx": onnx_name,
        "inputs": [_tensor(t) for t in spec.inputs],
        "outputs": [_tensor(t) for t in spec.outputs],
        **({"labels": list(spec.labels)} if spec.labels else {}),
        **({"description": spec.description} if spec.description else {}),
        **({"features": features} if features else {}),
        **extra,
    }
    copied = {}
    for key, source in artifacts.items():
        target = directory / source.name
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        copied[key] = target.name
    if copied:
        config["artifacts"] = copied
    path = directory / "config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _tensor(t: Any) -> dict[str, Any]:
    out = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
    if t.value_range is not None:
        out["range"] = list(t.value_range)
    return out
