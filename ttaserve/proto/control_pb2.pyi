from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SequenceId(_message.Message):
    __slots__ = ("number", "text")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    number: int
    text: str
    def __init__(self, number: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class ParameterSchema(_message.Message):
    __slots__ = ("name", "type", "default_json", "fixed", "min_json", "max_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JSON_FIELD_NUMBER: _ClassVar[int]
    FIXED_FIELD_NUMBER: _ClassVar[int]
    MIN_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_json: str
    fixed: bool
    min_json: str
    max_json: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_json: _Optional[str] = ..., fixed: _Optional[bool] = ..., min_json: _Optional[str] = ..., max_json: _Optional[str] = ...) -> None: ...

class PolicyDescription(_message.Message):
    __slots__ = ("name", "description", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterSchema]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[ParameterSchema, _Mapping]]] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyDescription]
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyDescription, _Mapping]]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("model", "sequence_id", "owner")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    model: str
    sequence_id: SequenceId
    owner: str
    def __init__(self, model: _Optional[str] = ..., sequence_id: _Optional[_Union[SequenceId, _Mapping]] = ..., owner: _Optional[str] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("model", "sequence_id", "policy", "params_json", "owner")
    class ParamsJsonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    model: str
    sequence_id: SequenceId
    policy: str
    params_json: _containers.ScalarMap[str, str]
    owner: str
    def __init__(self, model: _Optional[str] = ..., sequence_id: _Optional[_Union[SequenceId, _Mapping]] = ..., policy: _Optional[str] = ..., params_json: _Optional[_Mapping[str, str]] = ..., owner: _Optional[str] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("model", "sequence_id", "policy", "params_json", "owner")
    class ParamsJsonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    model: str
    sequence_id: SequenceId
    policy: str
    params_json: _containers.ScalarMap[str, str]
    owner: str
    def __init__(self, model: _Optional[str] = ..., sequence_id: _Optional[_Union[SequenceId, _Mapping]] = ..., policy: _Optional[str] = ..., params_json: _Optional[_Mapping[str, str]] = ..., owner: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("model", "owner")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    model: str
    owner: str
    def __init__(self, model: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("model", "sequence_id", "policy", "batches", "samples", "idle_seconds", "drift_score", "entropy", "resets", "state_bytes", "owner", "fallbacks", "on_source")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRIFT_SCORE_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    RESETS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    ON_SOURCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    sequence_id: SequenceId
    policy: str
    batches: int
    samples: int
    idle_seconds: float
    drift_score: float
    entropy: float
    resets: int
    state_bytes: int
    owner: str
    fallbacks: int
    on_source: bool
    def __init__(self, model: _Optional[str] = ..., sequence_id: _Optional[_Union[SequenceId, _Mapping]] = ..., policy: _Optional[str] = ..., batches: _Optional[int] = ..., samples: _Optional[int] = ..., idle_seconds: _Optional[float] = ..., drift_score: _Optional[float] = ..., entropy: _Optional[float] = ..., resets: _Optional[int] = ..., state_bytes: _Optional[int] = ..., owner: _Optional[str] = ..., fallbacks: _Optional[int] = ..., on_source: _Optional[bool] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("model", "sequence_id", "owner")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    model: str
    sequence_id: SequenceId
    owner: str
    def __init__(self, model: _Optional[str] = ..., sequence_id: _Optional[_Union[SequenceId, _Mapping]] = ..., owner: _Optional[str] = ...) -> None: ...

class SessionDetail(_message.Message):
    __slots__ = ("info", "signals", "resets_by_reason", "layer_divergence", "params_json", "fallbacks_by_reason")
    class SignalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ResetsByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LayerDivergenceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ParamsJsonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class FallbacksByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    INFO_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    RESETS_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    LAYER_DIVERGENCE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    info: SessionInfo
    signals: _containers.ScalarMap[str, float]
    resets_by_reason: _containers.ScalarMap[str, int]
    layer_divergence: _containers.ScalarMap[str, float]
    params_json: _containers.ScalarMap[str, str]
    fallbacks_by_reason: _containers.ScalarMap[str, int]
    def __init__(self, info: _Optional[_Union[SessionInfo, _Mapping]] = ..., signals: _Optional[_Mapping[str, float]] = ..., resets_by_reason: _Optional[_Mapping[str, int]] = ..., layer_divergence: _Optional[_Mapping[str, float]] = ..., params_json: _Optional[_Mapping[str, str]] = ..., fallbacks_by_reason: _Optional[_Mapping[str, int]] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class RestoreSessionRequest(_message.Message):
    __slots__ = ("target", "data")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    target: SessionRef
    data: bytes
    def __init__(self, target: _Optional[_Union[SessionRef, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
