from r2r_serve.proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("batch_id", "features")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    features: _containers.RepeatedCompositeFieldContainer[_common_pb2.RouterFeatures]
    def __init__(self, batch_id: _Optional[int] = ..., features: _Optional[_Iterable[_Union[_common_pb2.RouterFeatures, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("batch_id", "probabilities", "score_ms", "error")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    SCORE_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    score_ms: float
    error: str
    def __init__(self, batch_id: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ..., score_ms: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class GetRouterInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ThresholdPoint(_message.Message):
    __slots__ = ("threshold", "recall", "llm_share")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    LLM_SHARE_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    recall: float
    llm_share: float
    def __init__(self, threshold: _Optional[float] = ..., recall: _Optional[float] = ..., llm_share: _Optional[float] = ...) -> None: ...

class RouterInfo(_message.Message):
    __slots__ = ("strategy", "slm_name", "llm_name", "slm_tokenizer_fingerprint", "hidden_size", "top_k", "default_threshold", "checkpoint", "threshold_curve")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SLM_NAME_FIELD_NUMBER: _ClassVar[int]
    LLM_NAME_FIELD_NUMBER: _ClassVar[int]
    SLM_TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_CURVE_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    slm_name: str
    llm_name: str
    slm_tokenizer_fingerprint: str
    hidden_size: int
    top_k: int
    default_threshold: float
    checkpoint: str
    threshold_curve: _containers.RepeatedCompositeFieldContainer[ThresholdPoint]
    def __init__(self, strategy: _Optional[str] = ..., slm_name: _Optional[str] = ..., llm_name: _Optional[str] = ..., slm_tokenizer_fingerprint: _Optional[str] = ..., hidden_size: _Optional[int] = ..., top_k: _Optional[int] = ..., default_threshold: _Optional[float] = ..., checkpoint: _Optional[str] = ..., threshold_curve: _Optional[_Iterable[_Union[ThresholdPoint, _Mapping]]] = ...) -> None: ...
