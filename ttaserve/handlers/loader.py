"""Turn a model description (the demo, or a repository entry's config.json) into a
:class:`LoadedModel`: its wire spec, the prepared torch model and its default policy.

A model repository is a directory like Triton's: one sub-directory per model holding a
``config.json`` and the files it names (relative paths are resolved inside that
sub-directory). Example::

    {
      "inputs":  [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32], "range": [0, 1]}],
      "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
      "factory": "mypackage.models:resnet18_cifar",     (or "program": "model.pt2",
                                                          or "onnx": "model.onnx")
      "weights": "weights.safetensors",                  (with "factory"; or a torch state dict)
      "head": "fc",                                      (optional: the classifier module)
      "labels": ["airplane", "..."],                     (optional)
      "features": "/pool/Flatten_output_0",              (ONNX, optional: the head's input)
      "providers": ["CUDAExecutionProvider"],            (ONNX, optional: default automatic)
      "policy": "alpha-bn", "params": {"alpha": 0.1},     (optional default policy)
      "artifacts": {"adanpc.memory": "memory.safetensors",
                    "ecotta.meta": "meta.safetensors",
                    "t3.generalist": "generalist.safetensors"}
    }
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from ttaserve.adapters import ModelError, PreparedModel, prepare
from ttaserve.handlers.spec import ModelSpec, TensorSpec

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"  # Triton's platform name for ONNX Runtime models


class ModelConfigError(ValueError):
    """A model's configuration is invalid; the message names the file and the field."""


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: PreparedModel
    policy: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


def demo_model() -> LoadedModel:
    """The embedded demo classifier, served as ``demo``."""
    from ttaserve.models import CLASS_NAMES, demo

    spec = ModelSpec(
        name="demo",
        inputs=(TensorSpec("input", "FP32", (-1, 1, 28, 28), (0.0, 1.0)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
        labels=CLASS_NAMES,
        description="small ResNet with BatchNorm trained on Fashion-MNIST (ttaserve demo)",
    )
    return LoadedModel(spec, prepare(demo()))


def load_repository(path: str | Path) -> list[LoadedModel]:
    root = Path(path)
    if not root.is_dir():
        raise ModelConfigError(f"model repository {root} is not a directory")
    configs = sorted(root.glob("*/config.json"))
    if not configs:
        raise ModelConfigError(f"model repository {root} has no <model>/config.json")
    return [load_model_dir(c.parent) for c in configs]


def load_model_dir(directory: Path) -> LoadedModel:
    config_path = directory / "config.json"
    try:
        raw = json.loads(config_path.read_text())
        spec = ModelSpec(
            name=raw.get("name", directory.name),
            inputs=tuple(TensorSpec.from_config(t) for t in raw["inputs"]),
            outputs=tuple(TensorSpec.from_config(t) for t in raw["outputs"]),
            labels=tuple(raw.get("labels", ())),
            description=raw.get("description", ""),
        )
        if "onnx" in raw:
            prepared = _load_onnx(raw, directory)
            spec = replace(spec, platform=PLATFORM)
        else:
            prepared = prepare(_load_module(raw, directory), head=raw.get("head"),
                               channels_last=_channels_last(raw))
        for key, value in raw.get("artifacts", {}).items():
            if "onnx" in raw and key != "adanpc.memory":
                log.warning("%s: artifact %r ignored: the policy using it does not run on ONNX Runtime",
                            config_path, key)
                continue
            prepared.artifacts[key] = _artifact_loader(key, directory / value, raw, directory)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{config_path}: {type(exc).__name__}: {exc}") from exc
    except ModelError as exc:  # includes what ONNX graph analysis refuses
        raise ModelConfigError(f"{config_path}: {exc}") from exc
    log.info("loaded model %s from %s", spec.name, directory)
    return LoadedModel(spec, prepared, raw.get("policy"), dict(raw.get("params", {})))


def _channels_last(raw: dict[str, Any]) -> bool | None:
    value = raw.get("channels_last")  # None: prepare's default (channels-last on the CPU)
    if value is not None and not isinstance(value, bool):
        raise ModelConfigError(f"'channels_last' must be true or false, got {value!r}")
    return value


def _load_onnx(raw: dict[str, Any], directory: Path) -> PreparedModel:
    try:
        from ttaserve.handlers.onnx_model import load_onnx
    except ImportError as exc:
        raise ModelConfigError(f"serving an ONNX model needs onnx and onnxruntime: pip install "
                               f"'ttaserve[onnx]' ({exc})") from exc

    providers = raw.get("providers")
    if providers is not None and not (isinstance(providers, list) and all(isinstance(p, str) for p in providers)):
        raise ModelConfigError("'providers' must be a list of ONNX Runtime provider names")
    return load_onnx(directory / raw["onnx"], features=raw.get("features"), providers=providers)


def load_torch_module(directory: Path) -> tuple[ModelSpec, nn.Module]:
    """The wire spec and the plain (unprepared, eval-mode) torch module of a model directory
    that names a factory or a program (what ``ttaserve export-onnx`` exports)."""
    raw = json.loads((directory / "config.json").read_text())
    if "onnx" in raw:
        raise ModelConfigError(f"{directory / 'config.json'} already names an ONNX file")
    return load_model_dir(directory).spec, _load_module(raw, directory)


def _load_module(raw: dict[str, Any], directory: Path) -> nn.Module:
    if "program" in raw:
        from ttaserve.handlers.export_program import load_program

        return load_program(directory / raw["program"])
    if "factory" in raw:
        module = _factory(raw["factory"])()
        if "weights" in raw:
            from ttaserve.models import load_state

            load_state(module, str(directory / raw["weights"]))
        return module.eval()
    raise ModelConfigError("config.json needs 'factory' (with 'weights'), 'program' (.pt2) or 'onnx' (.onnx)")


def _factory(ref: str) -> Callable[[], nn.Module]:
    module_name, _, attr = ref.partition(":")
    if not attr:
        raise ModelConfigError(f"factory {ref!r} must look like 'package.module:function'")
    fn = getattr(importlib.import_module(module_name), attr, None)
    if not callable(fn):
        raise ModelConfigError(f"factory {ref!r}: {attr} is not a callable in {module_name}")
    return fn  # type: ignore[no-any-return]


def _artifact_loader(key: str, path: Path, raw: dict[str, Any], directory: Path) -> Callable[[], Any]:
    if not path.exists():
        raise ModelConfigError(f"artifact {key!r}: file {path} not found")
    if key == "t3.generalist":  # a second set of weights for the same architecture
        twin = {"program": str(path)} if "program" in raw else {**raw, "weights": str(path)}
        return lambda: prepare(_load_module(twin, directory), head=raw.get("head"),
                               channels_last=_channels_last(raw))

    def tensors() -> Any:
        from safetensors.torch import load_file

        return load_file(str(path))

    return tensors
