from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Rollout(_message.Message):
    __slots__ = ("model_name", "primary_version", "canary_version", "canary_percent", "shadow_versions", "generation", "serving_primary_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SERVING_PRIMARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    primary_version: str
    canary_version: str
    canary_percent: float
    shadow_versions: _containers.RepeatedScalarFieldContainer[str]
    generation: int
    serving_primary_version: str
    def __init__(self, model_name: _Optional[str] = ..., primary_version: _Optional[str] = ..., canary_version: _Optional[str] = ..., canary_percent: _Optional[float] = ..., shadow_versions: _Optional[_Iterable[str]] = ..., generation: _Optional[int] = ..., serving_primary_version: _Optional[str] = ...) -> None: ...

class RollbackEvent(_message.Message):
    __slots__ = ("version", "reason", "time_ms", "automatic")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    AUTOMATIC_FIELD_NUMBER: _ClassVar[int]
    version: str
    reason: str
    time_ms: int
    automatic: bool
    def __init__(self, version: _Optional[str] = ..., reason: _Optional[str] = ..., time_ms: _Optional[int] = ..., automatic: _Optional[bool] = ...) -> None: ...

class CandidateStats(_message.Message):
    __slots__ = ("version", "variant", "stats")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    version: str
    variant: str
    stats: _containers.ScalarMap[str, float]
    def __init__(self, version: _Optional[str] = ..., variant: _Optional[str] = ..., stats: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("rollout", "candidates", "rollbacks", "primary_alone_because")
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_ALONE_BECAUSE_FIELD_NUMBER: _ClassVar[int]
    rollout: Rollout
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateStats]
    rollbacks: _containers.RepeatedCompositeFieldContainer[RollbackEvent]
    primary_alone_because: str
    def __init__(self, rollout: _Optional[_Union[Rollout, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[CandidateStats, _Mapping]]] = ..., rollbacks: _Optional[_Iterable[_Union[RollbackEvent, _Mapping]]] = ..., primary_alone_because: _Optional[str] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetRolloutRequest(_message.Message):
    __slots__ = ("rollout", "expected_generation")
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    rollout: Rollout
    expected_generation: int
    def __init__(self, rollout: _Optional[_Union[Rollout, _Mapping]] = ..., expected_generation: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersionInfo(_message.Message):
    __slots__ = ("name", "version", "backend", "loaded", "error", "load_error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    backend: str
    loaded: bool
    error: str
    load_error: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., backend: _Optional[str] = ..., loaded: _Optional[bool] = ..., error: _Optional[str] = ..., load_error: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersionInfo, _Mapping]]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...
