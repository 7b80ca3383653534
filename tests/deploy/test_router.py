"""Which replica a request goes to: the session key of a request as the proxy hands it
over, and the router's choice (Ray's RequestRouter driven directly, without a cluster)."""

from __future__ import annotations

import asyncio
import pickle
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from ttaserve.deploy.affinity import request_session_key
from ttaserve.deploy.hashring import HashRing, session_key
from ttaserve.proto import grpc_service_pb2 as pb


def infer_request(model: str = "demo", **params: Any) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model)
    for kind, value in params.items():
        setattr(r.parameters["sequence_id"], kind, value)
    return r


@pytest.mark.parametrize(("params", "key"), [
    ({"int64_param": 7}, session_key("demo", 7)),
    ({"uint64_param": 7}, session_key("demo", 7)),
    ({"string_param": "cam-1"}, session_key("demo", "cam-1")),
    ({"int64_param": 0}, None),  # 0 and "" mean no sequence
    ({"string_param": ""}, None),
    ({"bool_param": True}, None),  # rejected by the replica; routed anywhere
    ({}, None),
])
def test_session_key_of_a_request(params: dict[str, Any], key: str | None) -> None:
    assert request_session_key(infer_request(**params)) == key


def test_non_inference_requests_have_no_key() -> None:
    assert request_session_key(pb.ModelMetadataRequest(name="demo")) is None
    assert request_session_key(b"bytes") is None


@dataclass(frozen=True)
class FakeId:
    unique_id: str


@dataclass(frozen=True)
class FakeReplica:
    replica_id: FakeId


@dataclass
class FakePending:
    args: list[Any]


def router() -> Any:
    pytest.importorskip("ray.serve.request_router", reason="pip install -e '.[ray]'")
    from ttaserve.deploy.router import SessionAffinityRouter

    return object.__new__(SessionAffinityRouter)  # choose_replicas needs none of Ray's state


def choose(r: Any, replicas: list[FakeReplica], arg: Any) -> list[list[FakeReplica]]:
    return asyncio.run(r.choose_replicas(replicas, FakePending([arg])))


def test_sequences_go_to_their_ring_owner_whichever_form_the_request_has() -> None:
    pytest.importorskip("ray.serve")
    from ray.serve._private.common import gRPCRequest

    r = router()
    replicas = [FakeReplica(FakeId(f"r{i}")) for i in range(3)]
    ring = HashRing(["r0", "r1", "r2"])
    for seq in range(1, 50):
        request = infer_request(int64_param=seq)
        owner = ring.node_for(session_key("demo", seq))
        proxied = pickle.dumps(gRPCRequest(user_request_proto=request))  # what the proxy sends
        for arg in (proxied, request):  # ... and what a deployment handle sends
            (rank,) = choose(r, replicas, arg)
            assert [x.replica_id.unique_id for x in rank] == [owner]


def test_unsequenced_requests_get_two_candidates_for_the_queue_length_choice() -> None:
    r = router()
    replicas = [FakeReplica(FakeId(f"r{i}")) for i in range(4)]
    seen: Counter[str] = Counter()
    for _ in range(200):
        (rank,) = choose(r, replicas, infer_request())
        assert len(rank) == 2 and rank[0] != rank[1]
        seen.update(x.replica_id.unique_id for x in rank)
    assert set(seen) == {"r0", "r1", "r2", "r3"}
    assert asyncio.run(r.choose_replicas([], None)) == []
