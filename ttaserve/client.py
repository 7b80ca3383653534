"""A thin client of the control service, used by ``ttaserve policy`` / ``ttaserve sessions``."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import grpc

from ttaserve.proto import control_pb2 as pb
from ttaserve.proto import control_pb2_grpc as pb_grpc

DEFAULT_URL = "127.0.0.1:8001"
_NUMBER = re.compile(r"-?[0-9]{1,20}")  # ASCII digits only ('٣'.isdigit() is True too)


def sequence_ref(raw: str | int | None) -> pb.SequenceId | None:
    """CLI text -> SequenceId: ASCII digits are numbers (as tritonclient sends ints), else text."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, int):
        return pb.SequenceId(number=raw)
    return pb.SequenceId(number=int(raw)) if _NUMBER.fullmatch(raw) else pb.SequenceId(text=raw)


class ControlClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url or os.environ.get("TTASERVE_URL", DEFAULT_URL)
        token = token or os.environ.get("TTASERVE_TOKEN")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = grpc.insecure_channel(self.url)
        self._stub = pb_grpc.AdaptationServiceStub(self._channel)
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any) -> Any:
        return getattr(self._stub, method)(request, metadata=self._metadata, timeout=self._timeout)

    def list_policies(self) -> pb.ListPoliciesResponse:
        return self._call("ListPolicies", pb.ListPoliciesRequest())

    # ``owner``: the principal whose session is meant (admin tokens only); "" = your own.
    def get_policy(self, model: str, sequence: str | int | None = None, owner: str = "") -> pb.PolicyInfo:
        return self._call("GetPolicy", pb.GetPolicyRequest(model=model, sequence_id=sequence_ref(sequence),
                                                           owner=owner))

    def set_policy(self, model: str, policy: str, params: dict[str, Any] | None = None,
                   sequence: str | int | None = None, owner: str = "") -> pb.PolicyInfo:
        encoded = {k: json.dumps(v) for k, v in (params or {}).items()}
        return self._call("SetPolicy", pb.SetPolicyRequest(
            model=model, policy=policy, params_json=encoded, sequence_id=sequence_ref(sequence), owner=owner))

    def list_sessions(self, model: str = "", owner: str = "") -> pb.ListSessionsResponse:
        return self._call("ListSessions", pb.ListSessionsRequest(model=model, owner=owner))

    def describe(self, model: str, sequence: str | int, owner: str = "") -> pb.SessionDetail:
        return self._call("DescribeSession", _ref(model, sequence, owner))

    def reset(self, model: str, sequence: str | int, owner: str = "") -> pb.SessionInfo:
        return self._call("ResetSession", _ref(model, sequence, owner))

    def snapshot(self, model: str, sequence: str | int, owner: str = "") -> bytes:
        return bytes(self._call("SnapshotSession", _ref(model, sequence, owner)).data)

    def restore(self, model: str, sequence: str | int, data: bytes, owner: str = "") -> pb.SessionInfo:
        return self._call("RestoreSession", pb.RestoreSessionRequest(target=_ref(model, sequence, owner), data=data))


def _ref(model: str, sequence: str | int, owner: str) -> pb.SessionRef:
    return pb.SessionRef(model=model, sequence_id=sequence_ref(sequence), owner=owner)
