from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    APPROVE: _ClassVar[Decision]
    REVIEW: _ClassVar[Decision]
    DECLINE: _ClassVar[Decision]

class Variant(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VARIANT_UNSPECIFIED: _ClassVar[Variant]
    PRIMARY: _ClassVar[Variant]
    CANARY: _ClassVar[Variant]

class DegradedReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEGRADED_REASON_UNSPECIFIED: _ClassVar[DegradedReason]
    FEATURES_STALE: _ClassVar[DegradedReason]
    FALLBACK_MODEL: _ClassVar[DegradedReason]
    DEADLINE_FALLBACK: _ClassVar[DegradedReason]
DECISION_UNSPECIFIED: Decision
APPROVE: Decision
REVIEW: Decision
DECLINE: Decision
VARIANT_UNSPECIFIED: Variant
PRIMARY: Variant
CANARY: Variant
DEGRADED_REASON_UNSPECIFIED: DegradedReason
FEATURES_STALE: DegradedReason
FALLBACK_MODEL: DegradedReason
DEADLINE_FALLBACK: DegradedReason

class Transaction(_message.Message):
    __slots__ = ("transaction_id", "card_id", "merchant_id", "device_id", "ip", "amount_minor", "currency", "mcc", "country", "event_time_ms")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_ID_FIELD_NUMBER: _ClassVar[int]
    MERCHANT_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    MCC_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    card_id: str
    merchant_id: str
    device_id: str
    ip: str
    amount_minor: int
    currency: str
    mcc: str
    country: str
    event_time_ms: int
    def __init__(self, transaction_id: _Optional[str] = ..., card_id: _Optional[str] = ..., merchant_id: _Optional[str] = ..., device_id: _Optional[str] = ..., ip: _Optional[str] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., mcc: _Optional[str] = ..., country: _Optional[str] = ..., event_time_ms: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "transaction", "include_features")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transaction: Transaction
    include_features: bool
    def __init__(self, request_id: _Optional[str] = ..., transaction: _Optional[_Union[Transaction, _Mapping]] = ..., include_features: _Optional[bool] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "variant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    variant: Variant
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., variant: _Optional[_Union[Variant, str]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_us", "features_us", "model_us", "total_us")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    FEATURES_US_FIELD_NUMBER: _ClassVar[int]
    MODEL_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    features_us: int
    model_us: int
    total_us: int
    def __init__(self, queue_us: _Optional[int] = ..., features_us: _Optional[int] = ..., model_us: _Optional[int] = ..., total_us: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "score", "decision", "model", "features", "degraded", "timings")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    score: float
    decision: Decision
    model: ModelRef
    features: _containers.ScalarMap[str, float]
    degraded: _containers.RepeatedScalarFieldContainer[DegradedReason]
    timings: Timings
    def __init__(self, request_id: _Optional[str] = ..., score: _Optional[float] = ..., decision: _Optional[_Union[Decision, str]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., features: _Optional[_Mapping[str, float]] = ..., degraded: _Optional[_Iterable[_Union[DegradedReason, str]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class FeaturesRequest(_message.Message):
    __slots__ = ("entity_type", "entity_id", "as_of_ms")
    ENTITY_TYPE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    AS_OF_MS_FIELD_NUMBER: _ClassVar[int]
    entity_type: str
    entity_id: str
    as_of_ms: int
    def __init__(self, entity_type: _Optional[str] = ..., entity_id: _Optional[str] = ..., as_of_ms: _Optional[int] = ...) -> None: ...

class FeaturesResponse(_message.Message):
    __slots__ = ("entity_type", "entity_id", "as_of_ms", "features", "newest_event_time_ms", "events_folded")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ENTITY_TYPE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    AS_OF_MS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    NEWEST_EVENT_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FOLDED_FIELD_NUMBER: _ClassVar[int]
    entity_type: str
    entity_id: str
    as_of_ms: int
    features: _containers.ScalarMap[str, float]
    newest_event_time_ms: int
    events_folded: int
    def __init__(self, entity_type: _Optional[str] = ..., entity_id: _Optional[str] = ..., as_of_ms: _Optional[int] = ..., features: _Optional[_Mapping[str, float]] = ..., newest_event_time_ms: _Optional[int] = ..., events_folded: _Optional[int] = ...) -> None: ...
