"""One registry of policies and one factory that validates parameters.

Every numeric parameter declares its allowed range in its Params dataclass field, read by
the factory (so a request, a config file, SetPolicy and a restored snapshot are all held to
the same bounds)::

    K: int = field(default=128, metadata=bounds(1, 1024))

Upper bounds are what keeps one parameter from costing unbounded memory or time (a K of
300000 stalls a worker; a snapshot claiming K=1e7 asks for gigabytes); the conformance
test refuses a policy whose numeric parameter has none.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

from ttaserve.adapters import compose
from ttaserve.adapters.base import Adapter
from ttaserve.adapters.model import PreparedModel
from ttaserve.errors import shown

_REGISTRY: dict[str, Callable[..., Adapter]] = {}
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}

T = TypeVar("T")


class PolicyError(ValueError):
    """Unknown policy or invalid policy parameters; the message says what is allowed."""


def bounds(low: float, high: float) -> dict[str, tuple[float, float]]:
    """Field metadata: the parameter must lie in [low, high] (both included)."""
    if not low <= high:
        raise ValueError(f"bounds({low}, {high}): low must not exceed high")
    return {"bounds": (low, high)}


def bounds_of(f: dataclasses.Field[Any]) -> tuple[float, float] | None:
    found = f.metadata.get("bounds")
    return None if found is None else (found[0], found[1])


def register(cls: T) -> T:
    """Class decorator: make a policy available under ``cls.name``."""
    name = cls.name  # type: ignore[attr-defined]
    if name in _REGISTRY or name in _ALIASES:
        raise ValueError(f"policy {name!r} registered twice")
    _REGISTRY[name] = cls  # type: ignore[assignment]
    return cls


def register_alias(alias: str, target: str, **params: Any) -> None:
    """``alias`` is ``target`` with some parameters fixed (e.g. tbn = alpha-bn, alpha=0)."""
    if alias in _REGISTRY or alias in _ALIASES:
        raise ValueError(f"policy {alias!r} registered twice")
    _ALIASES[alias] = (target, params)


def unregister(name: str) -> None:
    """Remove a policy or alias added at run time (a test that loads a policy file); the
    built-in policies stay registered for the life of the process otherwise."""
    if _REGISTRY.pop(name, None) is None and _ALIASES.pop(name, None) is None:
        raise PolicyError(f"policy {name!r} is not registered")


def policy_names() -> list[str]:
    return sorted([*_REGISTRY, *_ALIASES])


def params_class(name: str) -> type:
    target, _ = _resolve(name)
    params_cls: type = _REGISTRY[target].Params  # type: ignore[attr-defined]
    return params_cls


def param_schema(name: str) -> dict[str, dict[str, Any]]:
    """Parameter name -> {type, default} for a policy (aliases show their fixed values;
    a composition's parameters are named PART.KEY)."""
    if compose.is_composite(name):
        return {f"{part}.{k}": v for part in _parts(name) for k, v in param_schema(part).items()}
    target, fixed = _resolve(name)
    schema = {}
    for f in dataclasses.fields(params_class(target)):
        default = fixed.get(f.name, f.default)
        low, high = bounds_of(f) or (None, None)
        schema[f.name] = {"type": _type_name(f.type), "default": default, "fixed": f.name in fixed,
                          "min": low, "max": high}
    return schema


def describe(name: str) -> str:
    if compose.is_composite(name):
        norm, pred = _parts(name)
        return f"{pred} over {norm}'s normalization: {describe(pred)}"
    target, fixed = _resolve(name)
    text: str = _REGISTRY[target].description  # type: ignore[attr-defined]
    if fixed:
        text = f"{target} with " + ", ".join(f"{k}={v}" for k, v in fixed.items()) + f": {text}"
    return text


def canonical(name: str, params: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Resolve an alias: returns (registered name, parameters with the alias's fixed values).
    A composition resolves each part (``tbn+adanpc`` -> ``alpha-bn+adanpc``, alpha-bn.alpha=0)."""
    if compose.is_composite(name):
        return _canonical_composite(name, params or {})
    target, fixed = _resolve(name)
    merged = dict(params or {})
    for key, value in fixed.items():
        if key in merged and merged[key] != value:
            raise PolicyError(f"policy {name!r} fixes {key}={value}; use {target!r} to change it")
        merged[key] = value
    return target, merged


def create_adapter(name: str, model: PreparedModel | None = None, **params: Any) -> Adapter:
    """Build a policy by name with validated parameters; check it fits ``model`` if given."""
    if compose.is_composite(name):
        return _create_composite(name, model, params)
    target, merged = canonical(name, params)
    params_cls = params_class(target)
    known = {f.name: f for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(merged) - set(known))
    if unknown:
        raise PolicyError(
            f"policy {target!r} has no parameter(s) {shown(unknown)}; its parameters are {sorted(known)}"
        )
    coerced = {k: _checked(target, known[k], _coerce(target, known[k], v)) for k, v in merged.items()}
    try:
        adapter = _REGISTRY[target](params=params_cls(**coerced))
    except ValueError as exc:
        raise PolicyError(f"policy {target!r}: {exc}") from exc
    if model is not None:
        adapter.check(model)
    return adapter


def _parts(name: str) -> tuple[str, str]:
    try:
        norm, pred = compose.split(name)
    except ValueError as exc:
        raise PolicyError(str(exc)) from exc
    for part in (norm, pred):
        _resolve(part)
    return norm, pred


def _part_params(name: str, params: dict[str, Any]) -> tuple[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]]:
    parts = _parts(name)
    known = (set(param_schema(parts[0])), set(param_schema(parts[1])))
    try:
        return parts, compose.split_params(parts, params, known)
    except ValueError as exc:
        raise PolicyError(str(exc)) from exc


def _canonical_composite(name: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    parts, split = _part_params(name, params)
    resolved = [canonical(part, p) for part, p in zip(parts, split)]
    merged = {f"{target}.{k}": v for target, p in resolved for k, v in p.items()}
    return compose.SEPARATOR.join(target for target, _ in resolved), merged


def _create_composite(name: str, model: PreparedModel | None, params: dict[str, Any]) -> Adapter:
    parts, split = _part_params(name, params)
    norm, pred = (create_adapter(part, model, **p) for part, p in zip(parts, split))
    try:
        composite = compose.Composite(norm, pred)
    except ValueError as exc:
        raise PolicyError(f"{exc}. Compose NORM+PRED with NORM one of {', '.join(composable()[0])} "
                          f"and PRED one of {', '.join(composable()[1])}") from exc
    return composite  # type: ignore[return-value]


def composable() -> tuple[list[str], list[str]]:
    """(policies that can be the normalization part, policies that can run over one)."""
    built = {name: create_adapter(name) for name in policy_names()}
    return ([n for n, a in built.items() if compose.can_normalize(a)],
            [n for n, a in built.items() if compose.can_predict_over(a)])


def _resolve(name: str) -> tuple[str, dict[str, Any]]:
    if name in _ALIASES:
        return _ALIASES[name]
    if name in _REGISTRY:
        return name, {}
    raise PolicyError(f"unknown policy {shown(name)}; available: {', '.join(policy_names())}")


def _type_name(tp: Any) -> str:
    return tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))


def _checked(policy: str, f: dataclasses.Field[Any], value: Any) -> Any:
    """Refuse non-finite numbers and values outside the field's declared bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise PolicyError(f"policy {policy!r}: {f.name} must be a finite number, got {value}")
    limits = bounds_of(f)
    if limits is not None and not limits[0] <= value <= limits[1]:
        raise PolicyError(f"policy {policy!r}: {f.name} must be in "
                          f"[{_num(limits[0])}, {_num(limits[1])}], got {_num(value)}")
    return value


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _coerce(policy: str, f: dataclasses.Field[Any], value: Any) -> Any:
    kind = _type_name(f.type)
    try:
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "str" and isinstance(value, str):
            return value
    except (TypeError, ValueError):
        pass
    raise PolicyError(f"policy {policy!r}: parameter {f.name!r} must be {kind}, got {shown(value)}")
