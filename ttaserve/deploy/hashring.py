"""Consistent hashing of adaptation sessions onto replicas.

Every replica owns many points ("virtual nodes") on a 64-bit ring; a session key belongs to
the first point at or after its own hash. Adding or removing one of N replicas therefore
moves only the keys of the arcs that replica gains or loses, about 1/N of them, and every
router that knows the same replica set picks the same owner without talking to the others.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

from ttaserve.sessions import SequenceId

VNODES = 128  # points per replica: the load spread shrinks roughly with 1/sqrt(VNODES)


def ring_hash(text: str) -> int:
    """A stable 64-bit hash (Python's hash() is salted per process, so it cannot be shared)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def session_key(model: str, sequence_id: SequenceId) -> str:
    """The routing key of a session; int 5 and string "5" are different sequences."""
    kind = "int" if isinstance(sequence_id, int) else "str"
    return f"{model}\x00{kind}:{sequence_id}"


class HashRing:
    """An immutable ring over a set of node names."""

    def __init__(self, nodes: Iterable[str], vnodes: int = VNODES) -> None:
        self.nodes = frozenset(nodes)
        points = sorted((ring_hash(f"{node}#{i}"), node) for node in self.nodes for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [node for _, node in points]

    def node_for(self, key: str) -> str:
        """The node that owns ``key``; raises LookupError on an empty ring."""
        if not self._hashes:
            raise LookupError("no nodes on the ring")
        i = bisect.bisect_left(self._hashes, ring_hash(key))
        return self._owners[i % len(self._owners)]
