"""Reading an ONNX graph and rewriting it so that its BatchNorm layers stay adaptable.

ONNX Runtime folds ``BatchNormalization`` into the preceding ``Conv`` at its default
optimization level, which would leave nothing to adapt. So the graph is rewritten (with
the ``onnx`` library) once per normalization rule before a session is created: every
BatchNormalization on a 4-D activation (what ``nn.BatchNorm2d`` exports to) becomes

    per-sample moments (ReduceMean over H, W)  ->  the rule's statistics  ->  affine,

the per-sample moments become graph outputs (drift monitoring, the policies' updates) and
whatever per-session data the rule needs (alpha, UnMix-TNS components) become graph inputs.
No state is kept in ONNX Runtime: every run receives the session's state as inputs and
ttaserve applies any update afterwards, exactly as on the torch path.

The rules themselves live in :mod:`ttaserve.handlers.onnx_rules`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ttaserve.adapters.model import ModelError

log = logging.getLogger(__name__)

MIN_OPSET = 11
PREFIX = "ttaserve"
# metadata_props key: JSON list of the BatchNorm layer names in the torch module's order,
# written by ``ttaserve export-onnx``. Layers are numbered in that order (as ``prepare``
# numbers a torch model's), so a policy's per-layer state and its seeded initialization
# (UnMix-TNS components) are the torch model's. Without it, in graph execution order.
LAYER_ORDER_KEY = "ttaserve.layer_order"


class GraphError(ModelError):
    """The ONNX file cannot be served as asked; the message says what to change."""


@dataclass(frozen=True)
class BatchNormNode:
    """One adaptable BatchNormalization node and its constants (torch conventions)."""

    index: int  # position among adaptable layers, in graph (execution) order
    name: str  # layer name, from its parameters' names when they have one
    x: str
    y: str
    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    momentum: float  # torch's: the weight of the new batch (ONNX stores 1 - momentum)


@dataclass(frozen=True)
class GraphInfo:
    """What serving needs to know about a graph: its input, logits and feature tensors and
    its adaptable BatchNorm layers."""

    model: onnx.ModelProto
    opset: int
    input: str
    input_dtype: np.dtype[Any]
    output: str
    num_classes: int
    layers: tuple[BatchNormNode, ...]
    features: str | None  # the classifier head's input (AdaNPC), if found or named
    feature_shape: list[int | str] | None  # its shape as inferred (None: unknown)
    convolutions: int  # Conv nodes: with no BatchNorm left, a sign BN was fused into them


def mean_name(index: int) -> str:
    return f"{PREFIX}/bn{index}/mean"


def var_name(index: int) -> str:
    return f"{PREFIX}/bn{index}/var"


# -- analysis ---------------------------------------------------------------------------
def analyze(model: onnx.ModelProto, features: str | None = None) -> GraphInfo:
    """The serving-relevant facts of ``model``; raises GraphError with what to fix."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise GraphError(f"ONNX opset {opset} is too old; export with opset_version >= {MIN_OPSET} (17 recommended)")
    graph = model.graph
    constants = _constants(graph)
    inputs = [i for i in graph.input if i.name not in constants]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise GraphError(f"ttaserve serves models with one image input and one logits output; this graph "
                         f"has inputs {[i.name for i in inputs]} and outputs {[o.name for o in graph.output]}")
    shapes = _shapes(model)
    layers = _ordered(_batchnorms(graph, constants, shapes), _layer_order(model))
    if features is not None and features not in _tensor_names(graph):
        raise GraphError(f"feature tensor {features!r} is not a tensor of this graph")
    features = features or _head_input(graph)
    elem = inputs[0].type.tensor_type.elem_type
    return GraphInfo(
        model=model, opset=opset, input=inputs[0].name,
        input_dtype=np.dtype(helper.tensor_dtype_to_np_dtype(elem)), output=graph.output[0].name,
        num_classes=_last_dim(graph.output[0]), layers=tuple(layers),
        features=features, feature_shape=shapes.get(features) if features else None,
        convolutions=sum(n.op_type == "Conv" for n in graph.node),
    )


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values, followed through Identity nodes."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Inferred shapes of the graph's tensors (dims as ints, or names when symbolic)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # noqa: BLE001 - a graph onnx cannot infer still runs in ORT
        log.warning("ONNX shape inference failed (%s); BatchNorm ranks unknown", exc)
        inferred = model
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                     for d in v.type.tensor_type.shape.dim]
            for v in infos if v.type.tensor_type.HasField("shape")}


def _batchnorms(graph: onnx.GraphProto, constants: dict[str, np.ndarray],
                shapes: dict[str, list[int | str]]) -> list[BatchNormNode]:
    layers: list[BatchNormNode] = []
    for node in graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rank = len(shapes[node.input[0]]) if node.input[0] in shapes else None
        if rank != 4 or attrs.get("training_mode", 0) or len(node.output) != 1:
            # BatchNorm1d (rank 2/3) stays on source statistics, as on the torch path.
            log.info("BatchNormalization %s (rank %s) is not adapted", node.name or node.output[0], rank)
            continue
        params = [constants.get(name) for name in node.input[1:5]]
        if any(p is None for p in params):
            raise GraphError(f"BatchNormalization {node.name or node.output[0]}: its scale, bias, mean "
                             "and variance must be initializers (constants) of the graph")
        weight, bias, mean, var = (np.asarray(p, dtype=np.float32) for p in params)
        layers.append(BatchNormNode(
            index=len(layers), name=_layer_name(node), x=node.input[0], y=node.output[0],
            weight=weight, bias=bias, mean=mean, var=var, eps=float(attrs.get("epsilon", 1e-5)),
            momentum=1.0 - float(attrs.get("momentum", 0.9)),
        ))
    return layers


def _layer_order(model: onnx.ModelProto) -> list[str] | None:
    for prop in model.metadata_props:
        if prop.key == LAYER_ORDER_KEY:
            return list(json.loads(prop.value))
    return None


def _ordered(layers: list[BatchNormNode], order: list[str] | None) -> list[BatchNormNode]:
    """Renumber the layers in the recorded torch order (ignored unless it names each once)."""
    if order is None or sorted(order) != sorted(layer.name for layer in layers):
        if order is not None:
            log.warning("ignoring %s: it does not name the graph's BatchNorm layers", LAYER_ORDER_KEY)
        return layers
    rank = {name: i for i, name in enumerate(order)}
    return [replace(layer, index=rank[layer.name]) for layer in sorted(layers, key=lambda n: rank[n.name])]


def _layer_name(node: onnx.NodeProto) -> str:
    """``stem.2`` for parameters named ``stem.2.running_mean`` (torch exports), else the node."""
    mean = node.input[3]
    for suffix in (".running_mean", ".mean"):
        if mean.endswith(suffix):
            return mean[: -len(suffix)]
    return node.name or node.output[0]


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    return {name for node in graph.node for name in node.output} | {i.name for i in graph.input}


def _head_input(graph: onnx.GraphProto) -> str | None:
    """The input of the last Gemm (or MatMul): the classifier head's features."""
    heads = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    return heads[-1].input[0] if heads else None


def _last_dim(value: onnx.ValueInfoProto) -> int:
    dims = value.type.tensor_type.shape.dim
    return int(dims[-1].dim_value) if dims and dims[-1].HasField("dim_value") else 0


# -- rewriting --------------------------------------------------------------------------
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
