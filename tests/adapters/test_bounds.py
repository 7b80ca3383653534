"""Every numeric policy parameter declares bounds, and the one factory enforces them."""

from __future__ import annotations

import dataclasses
import math

import pytest

from ttaserve.adapters import PolicyError, create_adapter, param_schema, policy_names
from ttaserve.adapters.registry import bounds_of, params_class


def _numeric_fields(policy: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(params_class(policy)) if str(f.type) in ("int", "float")]


@pytest.mark.parametrize("policy", policy_names())
def test_every_numeric_parameter_is_bounded(policy: str) -> None:
    for f in _numeric_fields(policy):
        limits = bounds_of(f)
        assert limits is not None, (
            f"{policy}.{f.name} has no bounds: declare field(default=..., metadata=bounds(low, high))")
        assert limits[0] <= f.default <= limits[1], f"{policy}.{f.name}: default outside its bounds"
        assert math.isfinite(limits[0]) and math.isfinite(limits[1])
        assert param_schema(policy)[f.name]["max"] == limits[1]


@pytest.mark.parametrize("policy", policy_names())
def test_values_outside_bounds_and_non_finite_values_are_refused(policy: str) -> None:
    schema = param_schema(policy)
    for f in _numeric_fields(policy):
        if schema[f.name]["fixed"]:
            continue
        high = bounds_of(f)[1]  # type: ignore[index]
        above = high + 1 if str(f.type) == "int" else high * 2 + 1
        with pytest.raises(PolicyError, match=f": {f.name} must be in"):
            create_adapter(policy, **{f.name: above})
        if str(f.type) == "float":
            for bad in (math.nan, math.inf):
                with pytest.raises(PolicyError, match="finite"):
                    create_adapter(policy, **{f.name: bad})


def test_the_reported_stalls_are_refused() -> None:
    with pytest.raises(PolicyError, match=r"K must be in \[1, 1024\], got 300000"):
        create_adapter("unmix-tns", K=300000)
    with pytest.raises(PolicyError, match="K must be in"):
        create_adapter("unmix-tns", K=10_000_000.0)  # a float that is a whole number is an int
    with pytest.raises(PolicyError, match="steps must be in"):
        create_adapter("tent", steps=10**6)


def test_the_example_policy_declares_bounds(example_policy: str) -> None:
    test_every_numeric_parameter_is_bounded(example_policy)
    test_values_outside_bounds_and_non_finite_values_are_refused(example_policy)
