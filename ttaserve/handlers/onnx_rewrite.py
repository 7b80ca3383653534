"""Rewriting an ONNX graph so that its BatchNorm layers stay adaptable.

ONNX Runtime folds ``BatchNormalization`` into the preceding ``Conv`` at its default
optimization level, which would leave nothing to adapt. So the graph is rewritten (with
the ``onnx`` library) once per normalization rule before a session is created: every
adaptable BatchNormalization (:mod:`ttaserve.handlers.onnx_graph`) becomes

    per-sample moments (ReduceMean over H, W)  ->  the rule's statistics  ->  affine,

the per-sample moments become graph outputs (drift monitoring, the policies' updates) and
whatever per-session data the rule needs (alpha, UnMix-TNS components) become graph inputs.
No state is kept in ONNX Runtime: every run receives the session's state as inputs and
ttaserve applies any update afterwards, exactly as on the torch path.

The rules themselves live in :mod:`ttaserve.handlers.onnx_rules`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ttaserve.handlers.onnx_graph import BatchNormNode, GraphInfo

PREFIX = "ttaserve"


def var_name(index: int) -> str:
    return f"{PREFIX}/bn{index}/var"


def mean_name(index: int) -> str:
    return f"{PREFIX}/bn{index}/mean"


class Emitter:
    """Builds the nodes, inputs, outputs and constants added to a graph (opset-aware)."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: dict[str, onnx.ValueInfoProto] = {}
        self.outputs: dict[str, list[int | str] | None] = {}
        self.initializers: list[onnx.TensorProto] = []
        self._shared: dict[str, str] = {}
        self._count = 0

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        self._count += 1
        name = out or f"{PREFIX}/t{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=f"{PREFIX}/n{self._count}", **attrs))
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        self._count += 1
        name = f"{PREFIX}/c{self._count}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def input(self, name: str, shape: list[int | str]) -> str:
        """A float32 graph input (declared once, however many layers use it)."""
        if name not in self.inputs:
            self.inputs[name] = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
        return name

    def output(self, name: str, shape: list[int | str] | None) -> None:
        """Make ``name`` a float32 graph output (``shape`` None: unknown rank)."""
        self.outputs.setdefault(name, shape)

    def shared(self, key: str, make: Callable[[], str]) -> str:
        """A value computed once per graph (e.g. ``1 - alpha``)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        if self.opset >= 18:  # axes became an input in opset 18
            return self.op(op_type, x, self.const(axes, np.int64), keepdims=keepdims)
        return self.op(op_type, x, axes=axes, keepdims=keepdims)

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", x, self.const(axes, np.int64))
        return self.op("Unsqueeze", x, axes=axes)

    def l2_normalize(self, x: str) -> str:
        """x / max(||x||_2 over dim 1, 1e-12), as torch.nn.functional.normalize."""
        norm = self.op("Sqrt", self.reduce("ReduceSumSquare", x, [1], 1))
        return self.op("Div", x, self.op("Max", norm, self.const(1e-12)))


@dataclass(frozen=True)
class LayerNodes:
    """What a rule may use for one layer: tensor names in the graph being built."""

    layer: BatchNormNode
    inst_mean: str  # [B, C] per-sample mean over (H, W)
    inst_var: str  # [B, C] biased per-sample variance over (H, W)
    source_mean: str  # [C] the layer's running statistics
    source_var: str


class Statistics(Protocol):
    """A normalization rule's graph part: per-sample statistics ([B, C] mean and variance)
    of one layer, emitted with ``em``."""

    def statistics(self, em: Emitter, layer: LayerNodes) -> tuple[str, str]: ...


def rewrite(info: GraphInfo, rule: Statistics | None, moments: bool, features: bool) -> onnx.ModelProto:
    """A copy of the graph for one rule. ``rule=None`` keeps the BatchNorm nodes (source
    statistics; ORT may fuse them) and only adds the moments outputs if ``moments``."""
    em = Emitter(info.opset)
    by_output = {layer.y: layer for layer in info.layers}
    nodes: list[onnx.NodeProto] = []
    for node in info.model.graph.node:
        layer = by_output.get(node.output[0]) if node.op_type == "BatchNormalization" else None
        if layer is None:
            nodes.append(node)
            continue
        if rule is None:
            nodes.append(node)
        if rule is not None or moments:
            inst_mean, inst_var = _instance_moments(em, layer)
            if rule is not None:
                _normalize(em, layer, rule.statistics(em, _layer_nodes(em, layer, inst_mean, inst_var)))
        nodes.extend(em.nodes)
        em.nodes.clear()
    if features and info.features is not None:
        em.output(info.features, info.feature_shape)
    return _assemble(info.model, nodes, em)


def _layer_nodes(em: Emitter, layer: BatchNormNode, inst_mean: str, inst_var: str) -> LayerNodes:
    return LayerNodes(layer, inst_mean, inst_var, em.const(layer.mean), em.const(layer.var))


def _instance_moments(em: Emitter, layer: BatchNormNode) -> tuple[str, str]:
    """Per-sample mean and biased variance over (H, W), two passes, as graph outputs."""
    mean4 = em.reduce("ReduceMean", layer.x, [2, 3], 1)
    centred = em.op("Sub", layer.x, mean4)
    var4 = em.reduce("ReduceMean", em.op("Mul", centred, centred), [2, 3], 1)
    mean = em.op("Flatten", mean4, axis=1, out=mean_name(layer.index))
    var = em.op("Flatten", var4, axis=1, out=var_name(layer.index))
    channels = int(layer.mean.shape[0])
    em.output(mean, ["batch", channels])
    em.output(var, ["batch", channels])
    return mean, var


def _normalize(em: Emitter, layer: BatchNormNode, stats: tuple[str, str]) -> None:
    """y = weight * (x - mean) / sqrt(var + eps) + bias with [B, C] statistics, written to
    the BatchNorm's own output name so the rest of the graph is unchanged."""
    mean, var = stats
    scale = em.op("Div", em.const(layer.weight), em.op("Sqrt", em.op("Add", var, em.const(layer.eps))))
    shift = em.op("Sub", em.const(layer.bias), em.op("Mul", mean, scale))
    to4 = em.shared("shape_b_c_1_1", lambda: em.const([0, -1, 1, 1], np.int64))
    scaled = em.op("Mul", layer.x, em.op("Reshape", scale, to4))
    em.op("Add", scaled, em.op("Reshape", shift, to4), out=layer.y)


def _assemble(model: onnx.ModelProto, nodes: list[onnx.NodeProto], em: Emitter) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.extend(em.inputs.values())
    graph.initializer.extend(em.initializers)
    graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
                        for name, shape in em.outputs.items())
    return out
