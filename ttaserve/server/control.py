"""``ttaserve.v1.AdaptationService``: policies, sessions and snapshots over gRPC."""

from __future__ import annotations

import json
import time
from typing import Any

import grpc

from ttaserve.adapters import describe, param_schema, policy_names
from ttaserve.errors import InvalidInput
from ttaserve.proto import control_pb2 as pb
from ttaserve.proto import control_pb2_grpc as pb_grpc
from ttaserve.server.errors import status_of
from ttaserve.server.repository import Repository, ServedModel
from ttaserve.sessions import SequenceId, Session


def sequence_of(ref: pb.SequenceId) -> SequenceId | None:
    kind = ref.WhichOneof("kind")
    value = getattr(ref, kind) if kind else None
    return value or None


def sequence_message(sequence_id: SequenceId) -> pb.SequenceId:
    return pb.SequenceId(text=sequence_id) if isinstance(sequence_id, str) else pb.SequenceId(number=sequence_id)


def _required(ref: pb.SequenceId) -> SequenceId:
    sequence_id = sequence_of(ref)
    if sequence_id is None:
        raise InvalidInput("sequence_id is required (a non-zero number or a non-empty string)")
    return sequence_id


def _params(raw: Any) -> dict[str, Any]:
    try:
        return {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"params_json values must be JSON (e.g. \"0.2\", \"true\"): {exc}") from exc


def _params_json(params: dict[str, Any] | tuple[tuple[str, Any], ...]) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in dict(params).items()}


def list_policies() -> pb.ListPoliciesResponse:
    """Every registered policy with its parameter schema (also what ``ttaserve policy list
    --local`` prints, without a server)."""
    response = pb.ListPoliciesResponse()
    for name in policy_names():
        entry = response.policies.add(name=name, description=describe(name))
        for param, info in param_schema(name).items():
            entry.parameters.add(name=param, type=info["type"],
                                 default_json=json.dumps(info["default"]), fixed=info["fixed"])
    return response


def session_info(model: ServedModel, session: Session) -> pb.SessionInfo:
    signals = model.engine.signals_of(session)
    return pb.SessionInfo(
        model=model.name, sequence_id=sequence_message(session.sequence_id), policy=session.policy,
        batches=session.batches, samples=session.samples,
        idle_seconds=max(0.0, time.monotonic() - session.last_active),
        drift_score=signals.get("norm_divergence", 0.0), entropy=signals.get("entropy", 0.0),
        resets=sum(session.resets.values()), state_bytes=session.state.nbytes(),
    )


class ControlService(pb_grpc.AdaptationServiceServicer):
    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    async def _call(self, context: grpc.aio.ServicerContext, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # mapped in one place; the server lives on
            await context.abort(*status_of(exc))

    def _session(self, ref: pb.SessionRef) -> tuple[ServedModel, Session]:
        model = self.repository.get(ref.model)
        return model, model.live_session(_required(ref.sequence_id))

    async def ListPolicies(self, request: Any, context: Any) -> pb.ListPoliciesResponse:
        return list_policies()

    async def GetPolicy(self, request: pb.GetPolicyRequest, context: Any) -> pb.PolicyInfo:
        return await self._call(context, self._get_policy, request)

    def _get_policy(self, request: pb.GetPolicyRequest) -> pb.PolicyInfo:
        model = self.repository.get(request.model)
        sequence_id = sequence_of(request.sequence_id)
        if sequence_id is None:
            choice = model.engine.default
            return pb.PolicyInfo(model=model.name, policy=choice.name, params_json=_params_json(choice.params))
        _, session = self._session(pb.SessionRef(model=request.model, sequence_id=request.sequence_id))
        return pb.PolicyInfo(model=model.name, sequence_id=request.sequence_id, policy=session.policy,
                             params_json=_params_json(session.params))

    async def SetPolicy(self, request: pb.SetPolicyRequest, context: Any) -> pb.PolicyInfo:
        return await self._call(context, self._set_policy, request)

    def _set_policy(self, request: pb.SetPolicyRequest) -> pb.PolicyInfo:
        model = self.repository.get(request.model)
        params = _params(request.params_json)
        sequence_id = sequence_of(request.sequence_id)
        if sequence_id is None:
            choice = model.engine.set_default_policy(request.policy, **params)
            return pb.PolicyInfo(model=model.name, policy=choice.name, params_json=_params_json(choice.params))
        session = model.engine.set_session_policy(sequence_id, request.policy, **params)
        return pb.PolicyInfo(model=model.name, sequence_id=request.sequence_id, policy=session.policy,
                             params_json=_params_json(session.params))

    async def ListSessions(self, request: pb.ListSessionsRequest, context: Any) -> Any:
        return await self._call(context, self._list_sessions, request)

    def _list_sessions(self, request: pb.ListSessionsRequest) -> pb.ListSessionsResponse:
        models = [self.repository.get(request.model)] if request.model else list(self.repository)
        response = pb.ListSessionsResponse()
        for model in models:
            for session in model.engine.sessions.live():
                response.sessions.append(session_info(model, session))
        return response

    async def DescribeSession(self, request: pb.SessionRef, context: Any) -> pb.SessionDetail:
        return await self._call(context, self._describe, request)

    def _describe(self, request: pb.SessionRef) -> pb.SessionDetail:
        model, session = self._session(request)
        return pb.SessionDetail(
            info=session_info(model, session), signals=model.engine.signals_of(session),
            resets_by_reason=dict(session.resets), layer_divergence=model.engine.layer_divergence_of(session),
            params_json=_params_json(session.params),
        )

    async def ResetSession(self, request: pb.SessionRef, context: Any) -> pb.SessionInfo:
        return await self._call(context, self._reset, request)

    def _reset(self, request: pb.SessionRef) -> pb.SessionInfo:
        model = self.repository.get(request.model)
        return session_info(model, model.reset_session(_required(request.sequence_id)))

    async def SnapshotSession(self, request: pb.SessionRef, context: Any) -> pb.Snapshot:
        return await self._call(context, self._snapshot, request)

    def _snapshot(self, request: pb.SessionRef) -> pb.Snapshot:
        model, session = self._session(request)
        return pb.Snapshot(data=model.engine.snapshot(session.sequence_id))

    async def RestoreSession(self, request: pb.RestoreSessionRequest, context: Any) -> pb.SessionInfo:
        return await self._call(context, self._restore, request)

    def _restore(self, request: pb.RestoreSessionRequest) -> pb.SessionInfo:
        model = self.repository.get(request.target.model)
        sequence_id = sequence_of(request.target.sequence_id)
        if sequence_id is None:
            raise InvalidInput("target.sequence_id is required")
        session = model.engine.restore(sequence_id, request.data)
        return session_info(model, session)
