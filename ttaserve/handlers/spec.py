"""What a served model takes and returns, as the wire protocol describes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Triton datatype name -> numpy dtype (BF16 and BYTES have no plain numpy equivalent).
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DATATYPES = (*DTYPES, "BYTES", "BF16")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, Triton datatype, shape with -1 for the batch dimension,
    and for inputs an optional closed value range that requests must respect."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.datatype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: unsupported datatype {self.datatype!r}")
        if not self.shape or self.shape[0] != -1:
            raise ValueError(f"tensor {self.name!r}: the first dimension must be the batch (-1)")

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> TensorSpec:
        rng = raw.get("range")
        return cls(raw["name"], raw.get("datatype", "FP32"), tuple(int(d) for d in raw["shape"]),
                   tuple(rng) if rng else None)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...] = ()
    version: str = "1"
    platform: str = "pytorch_libtorch"
    description: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)
