"""Session affinity for Ray Serve: a custom request router (``RequestRouterConfig``).

Ray Serve runs one router per deployment handle, i.e. in every gRPC proxy. For a request
with a sequence id the router returns exactly one replica, the owner of ``(model,
sequence_id)`` on a consistent-hash ring over the live replicas' ids, so every proxy agrees
and a replica set change moves only about 1/N of the sequences. Ray's routing loop then
waits (with backoff) while that replica's queue is full rather than sending the request
elsewhere. Requests without a sequence id get Ray's usual "power of two choices": two
random replicas, the one with the shorter queue wins.

The base class assigns a chosen replica to *the* request it was chosen for (the FIFO mixin
of Ray's default router would hand it to the oldest waiting request, which would break
affinity), so this router deliberately does not use that mixin.
"""

from __future__ import annotations

import pickle
import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ttaserve.deploy.affinity import request_session_key
from ttaserve.deploy.hashring import HashRing


def pending_session_key(pending: PendingRequest | None) -> str | None:
    """The session key of a request on its way to a replica. The gRPC proxy sends the
    request as pickled bytes of Ray's ``gRPCRequest`` wrapper; a handle call passes the
    protobuf message itself."""
    if pending is None or len(pending.args) != 1:
        return None
    arg: Any = pending.args[0]
    if isinstance(arg, bytes):
        try:
            arg = pickle.loads(arg)  # Ray's own wrapper, built by its proxy in this process
        except Exception:
            return None
        arg = getattr(arg, "user_request_proto", None)
    return request_session_key(arg)


class SessionAffinityRouter(RequestRouter):
    _ring: HashRing | None = None

    def ring(self, replicas: list[RunningReplica]) -> HashRing:
        ids = frozenset(r.replica_id.unique_id for r in replicas)
        if self._ring is None or self._ring.nodes != ids:  # rebuilt only when the set changes
            self._ring = HashRing(ids)
        return self._ring

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_session_key(pending_request)
        if key is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        owner = self.ring(candidate_replicas).node_for(key)
        return [[r for r in candidate_replicas if r.replica_id.unique_id == owner]]
