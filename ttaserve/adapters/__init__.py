"""Adaptation policies. Importing this package registers every built-in policy."""

import importlib
import pkgutil

from ttaserve.adapters.base import Adapter, TensorState
from ttaserve.adapters.model import ModelError, PreparedModel, Unsupported, normalizer, prepare
from ttaserve.adapters.registry import (
    PolicyError,
    bounds,
    canonical,
    create_adapter,
    describe,
    param_schema,
    policy_names,
    register,
)

# The policy of a model that names none, in the server (README "Policies"): adapts, and is
# watched by the safety net (adapters/safety.py). `--policy source` opts out.
DEFAULT_POLICY = "graded-bn"

# Every module of this package other than the infrastructure below is a policy; importing
# it registers it. Adding a policy means adding one module here and nothing elsewhere.
_INFRASTRUCTURE = {"base", "compose", "model", "registry", "guard", "safety"}
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "DEFAULT_POLICY",
    "Adapter",
    "ModelError",
    "PolicyError",
    "PreparedModel",
    "TensorState",
    "Unsupported",
    "bounds",
    "canonical",
    "create_adapter",
    "describe",
    "normalizer",
    "param_schema",
    "policy_names",
    "prepare",
    "register",
]
