"""Wire types <-> domain types, in one place. Nothing else touches protobuf tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ttaserve.errors import InvalidInput, Overloaded, shown
from ttaserve.handlers.spec import DATATYPES, DTYPES, ModelSpec, TensorSpec
from ttaserve.proto import grpc_service_pb2 as pb
from ttaserve.server.keys import check_sequence_id

# Request parameters ttaserve understands, with the InferParameter fields each accepts.
_KNOWN_PARAMS: dict[str, tuple[str, ...]] = {
    "sequence_id": ("int64_param", "string_param", "uint64_param"),
    "sequence_start": ("bool_param",),
    "sequence_end": ("bool_param",),
    "priority": ("uint64_param", "int64_param"),
    "timeout": ("int64_param", "uint64_param"),
    "tta_policy": ("string_param",),
    "tta_adapt": ("bool_param",),
}
_TYPED_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}


@dataclass
class InferRequest:
    """A decoded, validated inference request."""

    model: str
    version: str
    request_id: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    sequence_id: int | str | None = None
    start: bool = False
    end: bool = False
    policy: str | None = None
    adapt: bool = True
    timeout_us: int = 0
    deadline: float | None = None  # time.monotonic() after which the request is not run
    extra: dict[str, Any] = field(default_factory=dict)


def parse_parameters(params: Any) -> dict[str, Any]:
    """Request parameters as Python values; wrong types and unknown reserved names raise."""
    values: dict[str, Any] = {}
    for name, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is None:
            raise InvalidInput(f"parameter {shown(name)} has no value")
        allowed = _KNOWN_PARAMS.get(name)
        if allowed is None and (name.startswith("triton_") or name.startswith("tta_")):
            raise InvalidInput(
                f"unknown parameter {shown(name)}; ttaserve understands "
                f"{', '.join(sorted(_KNOWN_PARAMS))}"
            )
        if allowed is not None and kind not in allowed:
            raise InvalidInput(
                f"parameter {name!r} must be {' or '.join(a.removesuffix('_param') for a in allowed)}, "
                f"got {kind.removesuffix('_param')}"
            )
        values[name] = getattr(param, kind)
    return values


def decode_request(request: pb.ModelInferRequest, spec: ModelSpec, max_batch: int) -> InferRequest:
    """Validate a ModelInferRequest against the model's spec and decode its tensors
    (zero-copy views for raw contents)."""
    params = parse_parameters(request.parameters)
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one raw buffer per input, in the same order"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        target = spec.input(tensor.name)
        if target is None:
            raise InvalidInput(
                f"unexpected input {shown(tensor.name)}; model {spec.name!r} takes "
                f"{[t.name for t in spec.inputs]}"
            )
        if tensor.name in inputs:
            raise InvalidInput(f"input {tensor.name!r} given twice")
        inputs[tensor.name] = _decode_tensor(tensor, raw[i] if raw else None, target, max_batch)
    missing = [t.name for t in spec.inputs if t.name not in inputs]
    if missing:
        raise InvalidInput(f"missing input(s) {missing} for model {spec.name!r}")
    _check_same_batch(inputs)
    outputs = tuple(o.name for o in request.outputs)
    unknown = [o for o in outputs if spec.output(o) is None]
    if unknown:
        raise InvalidInput(f"unknown output(s) {shown(unknown)}; model {spec.name!r} returns "
                           f"{[t.name for t in spec.outputs]}")
    sequence_id = check_sequence_id(params.get("sequence_id", 0))  # 0 and "" mean "no sequence"
    return InferRequest(
        model=request.model_name, version=request.model_version, request_id=request.id,
        inputs=inputs, outputs=outputs or tuple(t.name for t in spec.outputs),
        sequence_id=sequence_id, start=params.get("sequence_start", False),
        end=params.get("sequence_end", False), policy=params.get("tta_policy") or None,
        adapt=params.get("tta_adapt", True), timeout_us=int(params.get("timeout", 0)),
        extra=params,
    )


def _decode_tensor(tensor: Any, raw: bytes | None, spec: TensorSpec, max_batch: int) -> np.ndarray:
    name = tensor.name
    if tensor.datatype != spec.datatype:
        hint = "" if tensor.datatype in DATATYPES else " (not a datatype)"
        raise InvalidInput(f"input {name!r} must be {spec.datatype}, got {shown(tensor.datatype)}{hint}")
    shape = tuple(int(d) for d in tensor.shape)
    _check_shape(name, shape, spec.shape, max_batch)
    dtype = DTYPES[spec.datatype]
    count = int(np.prod(shape))
    if raw is not None:
        if tensor.HasField("contents"):  # Triton refuses the mix too; never ignore data silently
            raise InvalidInput(f"input {name!r} has both contents and raw_input_contents; send one of them")
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {name!r}: {len(raw)} bytes do not match shape {list(shape)} of "
                f"{spec.datatype} ({count * dtype.itemsize} bytes expected)"
            )
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    else:
        field_name = _TYPED_CONTENTS.get(spec.datatype)
        values = getattr(tensor.contents, field_name) if field_name else []
        if len(values) != count:
            raise InvalidInput(
                f"input {name!r}: {len(values)} values in contents.{field_name} do not match "
                f"shape {list(shape)} ({count} expected); or send raw_input_contents"
            )
        array = np.asarray(values, dtype=dtype).reshape(shape)
    _check_values(name, array, spec)
    return array


def _check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...], max_batch: int) -> None:
    fits = len(shape) == len(expected) and all(
        e == -1 or s == e for s, e in zip(shape[1:], expected[1:])
    )
    if not fits:
        raise InvalidInput(f"input {name!r} has shape {shown(list(shape))}, expected {list(expected)} "
                           "(-1: any batch size)")
    if shape[0] < 1:
        raise InvalidInput(f"input {name!r}: batch size {shape[0]} is outside 1..{max_batch}")
    if shape[0] > max_batch:
        raise Overloaded(f"input {name!r}: batch size {shape[0]} exceeds the server's cap "
                         f"(--max-batch-size={max_batch}); split it into smaller requests")


def _check_values(name: str, array: np.ndarray, spec: TensorSpec) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"input {name!r} contains NaN or Inf; send finite values")
    if spec.value_range is not None:
        low, high = spec.value_range
        if array.min() < low or array.max() > high:
            raise InvalidInput(
                f"input {name!r} has values in [{array.min():.4g}, {array.max():.4g}], "
                f"outside the model's range [{low:g}, {high:g}]"
            )


def _check_same_batch(inputs: dict[str, np.ndarray]) -> None:
    sizes = {a.shape[0] for a in inputs.values()}
    if len(sizes) > 1:
        raise InvalidInput(f"inputs disagree on the batch size: {sorted(sizes)}")


def encode_response(
    request: InferRequest, spec: ModelSpec, outputs: dict[str, np.ndarray], policy: str
) -> pb.ModelInferResponse:
    """Outputs always as raw_output_contents (tritonclient's as_numpy reads only those)."""
    response = pb.ModelInferResponse(
        model_name=spec.name, model_version=spec.version, id=request.request_id
    )
    response.parameters["tta_policy"].string_param = policy
    for name in request.outputs:
        array = np.ascontiguousarray(outputs[name], dtype=DTYPES[spec.output(name).datatype])  # type: ignore[union-attr]
        tensor = response.outputs.add(name=name, datatype=spec.output(name).datatype)  # type: ignore[union-attr]
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response
