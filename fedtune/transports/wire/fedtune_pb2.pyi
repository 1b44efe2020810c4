from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_id", "base_fingerprint", "capabilities", "client_version")
    class CapabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    base_fingerprint: str
    capabilities: _containers.ScalarMap[str, str]
    client_version: str
    def __init__(self, client_id: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., capabilities: _Optional[_Mapping[str, str]] = ..., client_version: _Optional[str] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_chunk_bytes", "max_upload_bytes", "max_message_bytes")
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_chunk_bytes: int
    max_upload_bytes: int
    max_message_bytes: int
    def __init__(self, max_chunk_bytes: _Optional[int] = ..., max_upload_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("accepted", "reason", "expected_fingerprint", "run_name", "algorithm", "heartbeat_interval_s", "limits")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    expected_fingerprint: str
    run_name: str
    algorithm: str
    heartbeat_interval_s: float
    limits: ServerLimits
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., expected_fingerprint: _Optional[str] = ..., run_name: _Optional[str] = ..., algorithm: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("client_id", "base_version")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    base_version: int
    def __init__(self, client_id: _Optional[str] = ..., base_version: _Optional[int] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("round", "client_id", "base_version", "train_json", "sync_meta_json", "has_setup", "setup_meta_json", "total_bytes", "sha256")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_JSON_FIELD_NUMBER: _ClassVar[int]
    SYNC_META_JSON_FIELD_NUMBER: _ClassVar[int]
    HAS_SETUP_FIELD_NUMBER: _ClassVar[int]
    SETUP_META_JSON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    round: int
    client_id: str
    base_version: int
    train_json: str
    sync_meta_json: str
    has_setup: bool
    setup_meta_json: str
    total_bytes: int
    sha256: bytes
    def __init__(self, round: _Optional[int] = ..., client_id: _Optional[str] = ..., base_version: _Optional[int] = ..., train_json: _Optional[str] = ..., sync_meta_json: _Optional[str] = ..., has_setup: _Optional[bool] = ..., setup_meta_json: _Optional[str] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class TaskChunk(_message.Message):
    __slots__ = ("kind", "retry_after_s", "message", "task_id", "index", "total", "header", "data")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[TaskChunk.Kind]
        TASK: _ClassVar[TaskChunk.Kind]
        WAIT: _ClassVar[TaskChunk.Kind]
        FINISHED: _ClassVar[TaskChunk.Kind]
    KIND_UNSPECIFIED: TaskChunk.Kind
    TASK: TaskChunk.Kind
    WAIT: TaskChunk.Kind
    FINISHED: TaskChunk.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    kind: TaskChunk.Kind
    retry_after_s: float
    message: str
    task_id: str
    index: int
    total: int
    header: TaskHeader
    data: bytes
    def __init__(self, kind: _Optional[_Union[TaskChunk.Kind, str]] = ..., retry_after_s: _Optional[float] = ..., message: _Optional[str] = ..., task_id: _Optional[str] = ..., index: _Optional[int] = ..., total: _Optional[int] = ..., header: _Optional[_Union[TaskHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RawTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[RawTensor.DType]
        F32: _ClassVar[RawTensor.DType]
        F64: _ClassVar[RawTensor.DType]
        F16: _ClassVar[RawTensor.DType]
        BF16: _ClassVar[RawTensor.DType]
        I64: _ClassVar[RawTensor.DType]
        I32: _ClassVar[RawTensor.DType]
        I16: _ClassVar[RawTensor.DType]
        I8: _ClassVar[RawTensor.DType]
        U8: _ClassVar[RawTensor.DType]
        BOOL: _ClassVar[RawTensor.DType]
    DTYPE_UNSPECIFIED: RawTensor.DType
    F32: RawTensor.DType
    F64: RawTensor.DType
    F16: RawTensor.DType
    BF16: RawTensor.DType
    I64: RawTensor.DType
    I32: RawTensor.DType
    I16: RawTensor.DType
    I8: RawTensor.DType
    U8: RawTensor.DType
    BOOL: RawTensor.DType
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: RawTensor.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[RawTensor.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("task_id", "index", "total", "total_bytes", "sha256", "data", "client_id", "num_examples", "metrics", "raw_tensors")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    RAW_TENSORS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    index: int
    total: int
    total_bytes: int
    sha256: bytes
    data: bytes
    client_id: str
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    raw_tensors: _containers.RepeatedCompositeFieldContainer[RawTensor]
    def __init__(self, task_id: _Optional[str] = ..., index: _Optional[int] = ..., total: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., data: _Optional[bytes] = ..., client_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., raw_tensors: _Optional[_Iterable[_Union[RawTensor, _Mapping]]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id", "task_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    task_id: str
    def __init__(self, client_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known", "heartbeat_interval_s", "run_finished", "cancel_task")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    CANCEL_TASK_FIELD_NUMBER: _ClassVar[int]
    known: bool
    heartbeat_interval_s: float
    run_finished: bool
    cancel_task: bool
    def __init__(self, known: _Optional[bool] = ..., heartbeat_interval_s: _Optional[float] = ..., run_finished: _Optional[bool] = ..., cancel_task: _Optional[bool] = ...) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("client_id", "task_id", "stage", "body")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    task_id: str
    stage: str
    body: bytes
    def __init__(self, client_id: _Optional[str] = ..., task_id: _Optional[str] = ..., stage: _Optional[str] = ..., body: _Optional[bytes] = ...) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("kind", "body", "retry_after_s", "reason")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[SecAggReply.Kind]
        ACK: _ClassVar[SecAggReply.Kind]
        WAIT: _ClassVar[SecAggReply.Kind]
        DATA: _ClassVar[SecAggReply.Kind]
        ABORT: _ClassVar[SecAggReply.Kind]
    KIND_UNSPECIFIED: SecAggReply.Kind
    ACK: SecAggReply.Kind
    WAIT: SecAggReply.Kind
    DATA: SecAggReply.Kind
    ABORT: SecAggReply.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: SecAggReply.Kind
    body: bytes
    retry_after_s: float
    reason: str
    def __init__(self, kind: _Optional[_Union[SecAggReply.Kind, str]] = ..., body: _Optional[bytes] = ..., retry_after_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...
