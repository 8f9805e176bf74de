from r2r_serve.proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExtendStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXTEND_OK: _ClassVar[ExtendStatus]
    EXTEND_RESYNC: _ClassVar[ExtendStatus]
    EXTEND_INVALID: _ClassVar[ExtendStatus]
    EXTEND_OVER_CAPACITY: _ClassVar[ExtendStatus]
EXTEND_OK: ExtendStatus
EXTEND_RESYNC: ExtendStatus
EXTEND_INVALID: ExtendStatus
EXTEND_OVER_CAPACITY: ExtendStatus

class ExtendItem(_message.Message):
    __slots__ = ("session_id", "position", "tokens", "sampling", "want_features", "verify_from")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    WANT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FROM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    want_features: bool
    verify_from: int
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., want_features: _Optional[bool] = ..., verify_from: _Optional[int] = ...) -> None: ...

class ExtendResult(_message.Message):
    __slots__ = ("session_id", "status", "token", "logprob", "held_tokens", "features", "error", "verify_start", "verify_tokens", "verify_logprobs", "verify_choice_logprobs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    HELD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    VERIFY_START_FIELD_NUMBER: _ClassVar[int]
    VERIFY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_CHOICE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    status: ExtendStatus
    token: int
    logprob: float
    held_tokens: int
    features: _common_pb2.RouterFeatures
    error: str
    verify_start: int
    verify_tokens: _containers.RepeatedScalarFieldContainer[int]
    verify_logprobs: _containers.RepeatedScalarFieldContainer[float]
    verify_choice_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, session_id: _Optional[str] = ..., status: _Optional[_Union[ExtendStatus, str]] = ..., token: _Optional[int] = ..., logprob: _Optional[float] = ..., held_tokens: _Optional[int] = ..., features: _Optional[_Union[_common_pb2.RouterFeatures, _Mapping]] = ..., error: _Optional[str] = ..., verify_start: _Optional[int] = ..., verify_tokens: _Optional[_Iterable[int]] = ..., verify_logprobs: _Optional[_Iterable[float]] = ..., verify_choice_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ExtendRequest(_message.Message):
    __slots__ = ("batch_id", "items")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    items: _containers.RepeatedCompositeFieldContainer[ExtendItem]
    def __init__(self, batch_id: _Optional[int] = ..., items: _Optional[_Iterable[_Union[ExtendItem, _Mapping]]] = ...) -> None: ...

class ExtendResponse(_message.Message):
    __slots__ = ("batch_id", "results", "forward_ms", "error")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    results: _containers.RepeatedCompositeFieldContainer[ExtendResult]
    forward_ms: float
    error: str
    def __init__(self, batch_id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[ExtendResult, _Mapping]]] = ..., forward_ms: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_ids",)
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("role", "model_name", "vocab_size", "tokenizer_fingerprint", "hidden_size", "dtype", "device", "max_sessions", "max_tokens_per_session", "max_total_tokens", "features_top_k", "eos_token_ids", "features_dtype")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_SESSION_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_TOP_K_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_DTYPE_FIELD_NUMBER: _ClassVar[int]
    role: str
    model_name: str
    vocab_size: int
    tokenizer_fingerprint: str
    hidden_size: int
    dtype: str
    device: str
    max_sessions: int
    max_tokens_per_session: int
    max_total_tokens: int
    features_top_k: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    features_dtype: str
    def __init__(self, role: _Optional[str] = ..., model_name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_sessions: _Optional[int] = ..., max_tokens_per_session: _Optional[int] = ..., max_total_tokens: _Optional[int] = ..., features_top_k: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., features_dtype: _Optional[str] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("active_sessions", "held_tokens", "batches", "evictions", "inflight_items", "forward_s", "prefill_s", "decode_s")
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    HELD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_ITEMS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    active_sessions: int
    held_tokens: int
    batches: int
    evictions: int
    inflight_items: int
    forward_s: float
    prefill_s: float
    decode_s: float
    def __init__(self, active_sessions: _Optional[int] = ..., held_tokens: _Optional[int] = ..., batches: _Optional[int] = ..., evictions: _Optional[int] = ..., inflight_items: _Optional[int] = ..., forward_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., decode_s: _Optional[float] = ...) -> None: ...

class GetTokenizerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenizerFiles(_message.Message):
    __slots__ = ("files", "fingerprint")
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    FILES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    files: _containers.ScalarMap[str, bytes]
    fingerprint: str
    def __init__(self, files: _Optional[_Mapping[str, bytes]] = ..., fingerprint: _Optional[str] = ...) -> None: ...
