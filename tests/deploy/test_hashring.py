"""The consistent-hash ring: stable owners, even spread, about 1/N of keys move."""

from __future__ import annotations

from collections import Counter

import pytest

from ttaserve.deploy.hashring import HashRing, ring_hash, session_key

KEYS = [session_key("demo", i) for i in range(8_000)]


def owners(ring: HashRing) -> dict[str, str]:
    return {k: ring.node_for(k) for k in KEYS}


def test_owner_is_a_function_of_the_node_set_only() -> None:
    a = HashRing(["r1", "r2", "r3"])
    b = HashRing(["r3", "r1", "r2"])
    assert owners(a) == owners(b)
    assert ring_hash("x") == ring_hash("x")  # not Python's salted hash()


def test_int_and_string_ids_are_different_keys() -> None:
    assert session_key("demo", 5) != session_key("demo", "5")
    assert session_key("a", 1) != session_key("b", 1)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_spread_is_even(n: int) -> None:
    counts = Counter(owners(HashRing([f"replica-{i}" for i in range(n)])).values())
    assert len(counts) == n
    share = [c / len(KEYS) for c in counts.values()]
    assert max(share) < 1.35 / n and min(share) > 0.65 / n, share


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_adding_a_replica_moves_about_one_in_n_plus_one(n: int) -> None:
    nodes = [f"replica-{i}" for i in range(n)]
    before, after = owners(HashRing(nodes)), owners(HashRing([*nodes, "new"]))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "new" for k in moved)  # keys only move to the newcomer
    assert abs(len(moved) / len(KEYS) - 1 / (n + 1)) < 0.35 / (n + 1)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_removing_a_replica_moves_only_its_keys(n: int) -> None:
    nodes = [f"replica-{i}" for i in range(n)]
    before, after = owners(HashRing(nodes)), owners(HashRing(nodes[1:]))
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == nodes[0]}
    assert abs(len(moved) / len(KEYS) - 1 / n) < 0.35 / n


def test_empty_ring_says_so() -> None:
    with pytest.raises(LookupError):
        HashRing([]).node_for("x")
