"""``ttaserve.v1.AdaptationService``: policies, sessions and snapshots over gRPC.

Every call acts in the caller's namespace (server/keys.py): a session is named by (model,
owner, sequence id), where an empty owner means the caller's own and only admin principals
may name another. Inference principals may only read (ListPolicies, GetPolicy, ListSessions,
DescribeSession: the gate refuses the rest) and only ever see their own sessions.

No engine work runs on the asyncio event loop: reads run on one small thread pool,
changes (which may wait for a session's lock while its forward pass runs, or build a
policy's initial state) on another, so ListSessions and health checks answer while a
ResetSession waits behind a long adaptation step. While the server drains, changes are
refused with UNAVAILABLE (nothing is applied after the grace period).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from ttaserve.adapters import describe, param_schema, policy_names
from ttaserve.errors import InvalidInput, Unavailable, shown
from ttaserve.proto import control_pb2 as pb
from ttaserve.proto import control_pb2_grpc as pb_grpc
from ttaserve.server.auth import Principal, Tokens, acting_for, header_of
from ttaserve.server.errors import status_of
from ttaserve.server.keys import SessionKey, check_sequence_id, key_of
from ttaserve.server.repository import Repository, ServedModel
from ttaserve.server.sealing import seal, unseal
from ttaserve.sessions import SequenceId, Session

_SNAPSHOT = (b"snapshot", b"TTSS", 2)  # purpose, magic, version of signed snapshots
MAX_PARAMS = 64


def sequence_of(ref: pb.SequenceId) -> SequenceId | None:
    kind = ref.WhichOneof("kind")
    return check_sequence_id(getattr(ref, kind)) if kind else None


def sequence_message(sequence_id: SequenceId | None) -> pb.SequenceId:
    if sequence_id is None:
        return pb.SequenceId()
    return pb.SequenceId(text=sequence_id) if isinstance(sequence_id, str) else pb.SequenceId(number=sequence_id)


def _params(raw: Any) -> dict[str, Any]:
    if len(raw) > MAX_PARAMS:
        raise InvalidInput(f"at most {MAX_PARAMS} parameters")
    try:
        params = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"params_json values must be JSON (e.g. \"0.2\", \"true\"): {exc}") from exc
    for name, value in params.items():
        if isinstance(value, (list, dict)) or value is None:
            raise InvalidInput(f"parameter {shown(name)} must be a number, a boolean or a string")
    return params


def _params_json(params: dict[str, Any] | tuple[tuple[str, Any], ...]) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in dict(params).items()}


def list_policies() -> pb.ListPoliciesResponse:
    """Every registered policy with its parameter schema (also what ``ttaserve policy list
    --local`` prints, without a server)."""
    response = pb.ListPoliciesResponse()
    for name in policy_names():
        entry = response.policies.add(name=name, description=describe(name))
        for param, info in param_schema(name).items():
            entry.parameters.add(
                name=param, type=info["type"], default_json=json.dumps(info["default"]), fixed=info["fixed"],
                min_json="" if info["min"] is None else json.dumps(info["min"]),
                max_json="" if info["max"] is None else json.dumps(info["max"]))
    return response


def session_info(model: ServedModel, session: Session) -> pb.SessionInfo:
    signals = model.engine.signals_of(session)
    key = key_of(session)
    return pb.SessionInfo(
        model=model.name, sequence_id=sequence_message(key.sequence_id), owner=key.owner,
        policy=session.policy, batches=session.batches, samples=session.samples,
        idle_seconds=max(0.0, time.monotonic() - session.last_active),
        drift_score=signals.get("norm_divergence", 0.0), entropy=signals.get("entropy", 0.0),
        resets=sum(session.resets.values()), state_bytes=session.state.nbytes(),
        fallbacks=sum(session.fallbacks.values()),
        on_source=session.safety is not None and session.safety.falling_back,
    )


class ControlService(pb_grpc.AdaptationServiceServicer):
    def __init__(self, repository: Repository, tokens: Tokens | None = None, secret: bytes = b"",
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.repository = repository
        self.tokens = tokens or Tokens()
        self.secret = secret
        self.draining = draining
        self._reads = ThreadPoolExecutor(2, thread_name_prefix="control-read")
        self._writes = ThreadPoolExecutor(4, thread_name_prefix="control-write")

    def shutdown(self) -> None:
        self._reads.shutdown(wait=False, cancel_futures=True)
        self._writes.shutdown(wait=False, cancel_futures=True)

    async def _read(self, context: grpc.aio.ServicerContext, fn: Callable[[Principal, Any], Any], request: Any,
                    locking: bool = False) -> Any:
        """Run a read; ``locking`` ones (they wait for a session's lock) share the change pool."""
        return await self._run(context, self._writes if locking else self._reads, fn, request, False)

    async def _write(self, context: grpc.aio.ServicerContext, fn: Callable[[Principal, Any], Any], request: Any) -> Any:
        return await self._run(context, self._writes, fn, request, True)

    async def _run(self, context: grpc.aio.ServicerContext, pool: ThreadPoolExecutor,
                   fn: Callable[[Principal, Any], Any], request: Any, change: bool) -> Any:
        try:
            caller = self.tokens.caller(header_of(context.invocation_metadata()))
            if change and self.draining():
                raise Unavailable("the server is shutting down; changes are no longer applied")
            return await asyncio.get_running_loop().run_in_executor(pool, fn, caller, request)
        except Exception as exc:  # mapped in one place; the server lives on
            await context.abort(*status_of(exc))

    def _key(self, caller: Principal, owner: str, ref: pb.SequenceId, field: str = "sequence_id") -> SessionKey:
        sequence_id = sequence_of(ref)
        if sequence_id is None:
            raise InvalidInput(f"{field} is required (a non-zero number or a non-empty string)")
        return SessionKey(acting_for(caller, owner), sequence_id)

    def _session(self, caller: Principal, ref: pb.SessionRef) -> tuple[ServedModel, Session]:
        model = self.repository.get(ref.model)
        return model, model.live_session(self._key(caller, ref.owner, ref.sequence_id))

    # -- policies ---------------------------------------------------------------------
    async def ListPolicies(self, request: Any, context: Any) -> pb.ListPoliciesResponse:
        return await self._read(context, lambda caller, _: list_policies(), request)

    async def GetPolicy(self, request: pb.GetPolicyRequest, context: Any) -> pb.PolicyInfo:
        return await self._read(context, self._get_policy, request)

    def _get_policy(self, caller: Principal, request: pb.GetPolicyRequest) -> pb.PolicyInfo:
        model = self.repository.get(request.model)
        if sequence_of(request.sequence_id) is None:
            choice = model.engine.default
            return pb.PolicyInfo(model=model.name, policy=choice.name, params_json=_params_json(choice.params))
        _, session = self._session(caller, pb.SessionRef(model=request.model, sequence_id=request.sequence_id,
                                                         owner=request.owner))
        return pb.PolicyInfo(model=model.name, sequence_id=request.sequence_id, policy=session.policy,
                             params_json=_params_json(session.params), owner=key_of(session).owner)

    async def SetPolicy(self, request: pb.SetPolicyRequest, context: Any) -> pb.PolicyInfo:
        return await self._write(context, self._set_policy, request)

    def _set_policy(self, caller: Principal, request: pb.SetPolicyRequest) -> pb.PolicyInfo:
        model = self.repository.get(request.model)
        params = _params(request.params_json)
        if sequence_of(request.sequence_id) is None:
            choice = model.engine.set_default_policy(request.policy, **params)
            return pb.PolicyInfo(model=model.name, policy=choice.name, params_json=_params_json(choice.params))
        key = self._key(caller, request.owner, request.sequence_id)
        session = model.engine.set_session_policy(key, request.policy, **params)
        model.sessions_changed(key)
        return pb.PolicyInfo(model=model.name, sequence_id=request.sequence_id, policy=session.policy,
                             params_json=_params_json(session.params), owner=key.owner)

    # -- sessions ---------------------------------------------------------------------
    async def ListSessions(self, request: pb.ListSessionsRequest, context: Any) -> Any:
        return await self._read(context, self._list_sessions, request)

    def _list_sessions(self, caller: Principal, request: pb.ListSessionsRequest) -> pb.ListSessionsResponse:
        models = [self.repository.get(request.model)] if request.model else list(self.repository)
        owner = acting_for(caller, request.owner) if request.owner or not caller.admin else None
        response = pb.ListSessionsResponse()
        for model in models:
            for session in model.engine.sessions.live():
                if owner is None or key_of(session).owner == owner:
                    response.sessions.append(session_info(model, session))
        return response

    async def DescribeSession(self, request: pb.SessionRef, context: Any) -> pb.SessionDetail:
        return await self._read(context, self._describe, request)

    def _describe(self, caller: Principal, request: pb.SessionRef) -> pb.SessionDetail:
        model, session = self._session(caller, request)
        return pb.SessionDetail(
            info=session_info(model, session), signals=model.engine.signals_of(session),
            resets_by_reason=dict(session.resets), fallbacks_by_reason=dict(session.fallbacks), layer_divergence=model.engine.layer_divergence_of(session),
            params_json=_params_json(session.params),
        )

    async def ResetSession(self, request: pb.SessionRef, context: Any) -> pb.SessionInfo:
        return await self._write(context, self._reset, request)

    def _reset(self, caller: Principal, request: pb.SessionRef) -> pb.SessionInfo:
        model = self.repository.get(request.model)
        return session_info(model, model.reset_session(self._key(caller, request.owner, request.sequence_id)))

    async def SnapshotSession(self, request: pb.SessionRef, context: Any) -> pb.Snapshot:
        return await self._read(context, self._snapshot, request, locking=True)

    def _snapshot(self, caller: Principal, request: pb.SessionRef) -> pb.Snapshot:
        model, session = self._session(caller, request)
        return pb.Snapshot(data=seal(self.secret, *_SNAPSHOT, model.engine.snapshot_of(session)))

    async def RestoreSession(self, request: pb.RestoreSessionRequest, context: Any) -> pb.SessionInfo:
        return await self._write(context, self._restore, request)

    def _restore(self, caller: Principal, request: pb.RestoreSessionRequest) -> pb.SessionInfo:
        model = self.repository.get(request.target.model)
        key = self._key(caller, request.target.owner, request.target.sequence_id, "target.sequence_id")
        data = unseal(self.secret, *_SNAPSHOT, request.data, "snapshot")
        session = model.engine.restore(key, data)
        model.sessions_changed(key)
        return session_info(model, session)

