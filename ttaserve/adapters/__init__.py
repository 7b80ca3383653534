"""Adaptation policies. Importing this package registers every built-in policy."""

from ttaserve.adapters import alpha_bn, source  # noqa: F401  (registration side effect)
from ttaserve.adapters.base import Adapter, TensorState
from ttaserve.adapters.model import ModelError, PreparedModel, normalizer, prepare
from ttaserve.adapters.registry import (
    PolicyError,
    canonical,
    create_adapter,
    describe,
    param_schema,
    policy_names,
    register,
)

__all__ = [
    "Adapter",
    "ModelError",
    "PolicyError",
    "PreparedModel",
    "TensorState",
    "canonical",
    "create_adapter",
    "describe",
    "normalizer",
    "param_schema",
    "policy_names",
    "prepare",
    "register",
]
