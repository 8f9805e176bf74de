from r2r_serve.proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatInput(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "chat", "prompt_token_ids", "max_tokens", "sampling", "stop", "stop_token_ids", "threshold", "logprobs", "timeout_ms", "ignore_eos", "llm_share", "rollback_below", "max_draft_tokens", "min_draft_probability")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LLM_SHARE_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_BELOW_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_DRAFT_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    chat: ChatInput
    prompt_token_ids: TokenIds
    max_tokens: int
    sampling: _common_pb2.SamplingParams
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    threshold: float
    logprobs: bool
    timeout_ms: int
    ignore_eos: bool
    llm_share: float
    rollback_below: float
    max_draft_tokens: int
    min_draft_probability: float
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., chat: _Optional[_Union[ChatInput, _Mapping]] = ..., prompt_token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., threshold: _Optional[float] = ..., logprobs: _Optional[bool] = ..., timeout_ms: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., llm_share: _Optional[float] = ..., rollback_below: _Optional[float] = ..., max_draft_tokens: _Optional[int] = ..., min_draft_probability: _Optional[float] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("index", "token_id", "text", "provenance", "logprob", "router_probability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    ROUTER_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_id: int
    text: str
    provenance: _common_pb2.Provenance
    logprob: float
    router_probability: float
    def __init__(self, index: _Optional[int] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., provenance: _Optional[_Union[_common_pb2.Provenance, str]] = ..., logprob: _Optional[float] = ..., router_probability: _Optional[float] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "completion_tokens", "llm_tokens", "llm_share", "time_to_first_token_s", "total_s", "tokens_per_s", "stop_sequence", "text_tail", "verify_passes", "rollbacks", "discarded_tokens", "load_llm_only_tokens")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LLM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LLM_SHARE_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_TAIL_FIELD_NUMBER: _ClassVar[int]
    VERIFY_PASSES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOAD_LLM_ONLY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    llm_tokens: int
    llm_share: float
    time_to_first_token_s: float
    total_s: float
    tokens_per_s: float
    stop_sequence: str
    text_tail: str
    verify_passes: int
    rollbacks: int
    discarded_tokens: int
    load_llm_only_tokens: int
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., llm_tokens: _Optional[int] = ..., llm_share: _Optional[float] = ..., time_to_first_token_s: _Optional[float] = ..., total_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., stop_sequence: _Optional[str] = ..., text_tail: _Optional[str] = ..., verify_passes: _Optional[int] = ..., rollbacks: _Optional[int] = ..., discarded_tokens: _Optional[int] = ..., load_llm_only_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token: TokenEvent
    final: GenerationStats
    def __init__(self, request_id: _Optional[str] = ..., token: _Optional[_Union[TokenEvent, _Mapping]] = ..., final: _Optional[_Union[GenerationStats, _Mapping]] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "provenance", "logprobs", "stats")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    provenance: _containers.RepeatedScalarFieldContainer[_common_pb2.Provenance]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    stats: GenerationStats
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., provenance: _Optional[_Iterable[_Union[_common_pb2.Provenance, str]]] = ..., logprobs: _Optional[_Iterable[float]] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("slm_model", "llm_model", "router_strategy", "default_threshold", "tokenizer_fingerprint", "slm_endpoints", "llm_endpoints", "router_endpoint", "max_concurrent_sessions", "active_sessions", "max_context", "version")
    SLM_MODEL_FIELD_NUMBER: _ClassVar[int]
    LLM_MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUTER_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SLM_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    LLM_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    slm_model: str
    llm_model: str
    router_strategy: str
    default_threshold: float
    tokenizer_fingerprint: str
    slm_endpoints: _containers.RepeatedScalarFieldContainer[str]
    llm_endpoints: _containers.RepeatedScalarFieldContainer[str]
    router_endpoint: str
    max_concurrent_sessions: int
    active_sessions: int
    max_context: int
    version: str
    def __init__(self, slm_model: _Optional[str] = ..., llm_model: _Optional[str] = ..., router_strategy: _Optional[str] = ..., default_threshold: _Optional[float] = ..., tokenizer_fingerprint: _Optional[str] = ..., slm_endpoints: _Optional[_Iterable[str]] = ..., llm_endpoints: _Optional[_Iterable[str]] = ..., router_endpoint: _Optional[str] = ..., max_concurrent_sessions: _Optional[int] = ..., active_sessions: _Optional[int] = ..., max_context: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...
