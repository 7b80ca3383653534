"""Reading an ONNX graph: its input, logits and feature tensors, and the BatchNorm layers
that can be adapted (with their constants). Rewriting it: :mod:`ttaserve.handlers.onnx_rewrite`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ttaserve.adapters.model import ModelError

log = logging.getLogger(__name__)

MIN_OPSET = 11
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
