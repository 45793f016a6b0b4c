from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "backend", "memory_gb", "bandwidth_gbps", "tflops", "profile", "version", "model", "start", "end", "active_requests", "backends", "standby", "rss_bytes", "kv_bytes", "kv_budget_bytes", "kv_reserved_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_GBPS_FIELD_NUMBER: _ClassVar[int]
    TFLOPS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    STANDBY_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    backend: str
    memory_gb: float
    bandwidth_gbps: float
    tflops: float
    profile: str
    version: str
    model: str
    start: int
    end: int
    active_requests: int
    backends: _containers.RepeatedScalarFieldContainer[str]
    standby: bool
    rss_bytes: int
    kv_bytes: int
    kv_budget_bytes: int
    kv_reserved_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., backend: _Optional[str] = ..., memory_gb: _Optional[float] = ..., bandwidth_gbps: _Optional[float] = ..., tflops: _Optional[float] = ..., profile: _Optional[str] = ..., version: _Optional[str] = ..., model: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., active_requests: _Optional[int] = ..., backends: _Optional[_Iterable[str]] = ..., standby: _Optional[bool] = ..., rss_bytes: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., kv_reserved_bytes: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model", "start", "end", "backend", "dtype", "words")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    start: int
    end: int
    backend: str
    dtype: str
    words: bool
    def __init__(self, model: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., backend: _Optional[str] = ..., dtype: _Optional[str] = ..., words: _Optional[bool] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("seconds", "hidden_size", "vocab_size", "total_layers", "split_invariant", "fresh_copies", "kv_budget_bytes", "kv_layout", "word_lead")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_INVARIANT_FIELD_NUMBER: _ClassVar[int]
    FRESH_COPIES_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    WORD_LEAD_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    hidden_size: int
    vocab_size: int
    total_layers: int
    split_invariant: bool
    fresh_copies: bool
    kv_budget_bytes: int
    kv_layout: str
    word_lead: bool
    def __init__(self, seconds: _Optional[float] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., total_layers: _Optional[int] = ..., split_invariant: _Optional[bool] = ..., fresh_copies: _Optional[bool] = ..., kv_budget_bytes: _Optional[int] = ..., kv_layout: _Optional[str] = ..., word_lead: _Optional[bool] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "has_seed", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs", "bias_ids", "bias_values")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    BIAS_IDS_FIELD_NUMBER: _ClassVar[int]
    BIAS_VALUES_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    has_seed: bool
    seed: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logprobs: int
    bias_ids: _containers.RepeatedScalarFieldContainer[int]
    bias_values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., has_seed: _Optional[bool] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logprobs: _Optional[int] = ..., bias_ids: _Optional[_Iterable[int]] = ..., bias_values: _Optional[_Iterable[float]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("request_id", "position", "tokens", "hidden", "sampling", "n_prompt", "prefill_only", "allowed", "score", "score_top", "batched", "draws", "reuse", "copy", "max_positions", "replay")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    N_PROMPT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ONLY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCORE_TOP_FIELD_NUMBER: _ClassVar[int]
    BATCHED_FIELD_NUMBER: _ClassVar[int]
    DRAWS_FIELD_NUMBER: _ClassVar[int]
    REUSE_FIELD_NUMBER: _ClassVar[int]
    COPY_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    position: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    sampling: Sampling
    n_prompt: int
    prefill_only: bool
    allowed: bytes
    score: bool
    score_top: int
    batched: bool
    draws: int
    reuse: str
    copy: bool
    max_positions: int
    replay: bool
    def __init__(self, request_id: _Optional[str] = ..., position: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., n_prompt: _Optional[int] = ..., prefill_only: _Optional[bool] = ..., allowed: _Optional[bytes] = ..., score: _Optional[bool] = ..., score_top: _Optional[int] = ..., batched: _Optional[bool] = ..., draws: _Optional[int] = ..., reuse: _Optional[str] = ..., copy: _Optional[bool] = ..., max_positions: _Optional[int] = ..., replay: _Optional[bool] = ...) -> None: ...

class StepBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StepRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[StepRequest, _Mapping]]] = ...) -> None: ...

class TokenChoice(_message.Message):
    __slots__ = ("token_id", "logprob", "has_logprob", "top_ids", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    HAS_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    has_logprob: bool
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., has_logprob: _Optional[bool] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("hidden", "token", "position", "compute_ms", "scored", "score_logprobs", "score_top_ids", "score_top_logprobs", "status", "message")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    SCORE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SCORE_TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    token: TokenChoice
    position: int
    compute_ms: float
    scored: bool
    score_logprobs: _containers.RepeatedScalarFieldContainer[float]
    score_top_ids: _containers.RepeatedScalarFieldContainer[int]
    score_top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    status: str
    message: str
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., token: _Optional[_Union[TokenChoice, _Mapping]] = ..., position: _Optional[int] = ..., compute_ms: _Optional[float] = ..., scored: _Optional[bool] = ..., score_logprobs: _Optional[_Iterable[float]] = ..., score_top_ids: _Optional[_Iterable[int]] = ..., score_top_logprobs: _Optional[_Iterable[float]] = ..., status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StepBatchReply(_message.Message):
    __slots__ = ("replies",)
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[StepReply]
    def __init__(self, replies: _Optional[_Iterable[_Union[StepReply, _Mapping]]] = ...) -> None: ...

class EndRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class EndReply(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class MemberRequest(_message.Message):
    __slots__ = ("request_id", "position", "tokens", "top_k", "score", "no_distribution", "score_top", "propose", "sampling", "stop_ids", "copy_from", "until_word", "fresh", "speculate", "score_dense", "words", "open_top", "lead")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    NO_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    SCORE_TOP_FIELD_NUMBER: _ClassVar[int]
    PROPOSE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    COPY_FROM_FIELD_NUMBER: _ClassVar[int]
    UNTIL_WORD_FIELD_NUMBER: _ClassVar[int]
    FRESH_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_FIELD_NUMBER: _ClassVar[int]
    SCORE_DENSE_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    OPEN_TOP_FIELD_NUMBER: _ClassVar[int]
    LEAD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    position: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    score: bool
    no_distribution: bool
    score_top: int
    propose: int
    sampling: Sampling
    stop_ids: _containers.RepeatedScalarFieldContainer[int]
    copy_from: str
    until_word: bool
    fresh: bool
    speculate: bool
    score_dense: bool
    words: int
    open_top: int
    lead: int
    def __init__(self, request_id: _Optional[str] = ..., position: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., score: _Optional[bool] = ..., no_distribution: _Optional[bool] = ..., score_top: _Optional[int] = ..., propose: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., stop_ids: _Optional[_Iterable[int]] = ..., copy_from: _Optional[str] = ..., until_word: _Optional[bool] = ..., fresh: _Optional[bool] = ..., speculate: _Optional[bool] = ..., score_dense: _Optional[bool] = ..., words: _Optional[int] = ..., open_top: _Optional[int] = ..., lead: _Optional[int] = ...) -> None: ...

class MemberReply(_message.Message):
    __slots__ = ("logprobs", "top_ids", "top_logprobs", "rest_logprob", "token_logprobs", "position", "score_top_ids", "score_top_logprobs", "status", "message", "proposed", "proposed_logprobs", "ended", "end_logprob", "score_rows", "open_top_ids", "open_top_logprobs")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SCORE_TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    END_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    SCORE_ROWS_FIELD_NUMBER: _ClassVar[int]
    OPEN_TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    OPEN_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: Tensor
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    rest_logprob: float
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    position: int
    score_top_ids: _containers.RepeatedScalarFieldContainer[int]
    score_top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    status: str
    message: str
    proposed: _containers.RepeatedScalarFieldContainer[int]
    proposed_logprobs: _containers.RepeatedScalarFieldContainer[float]
    ended: bool
    end_logprob: float
    score_rows: Tensor
    open_top_ids: _containers.RepeatedScalarFieldContainer[int]
    open_top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., rest_logprob: _Optional[float] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., position: _Optional[int] = ..., score_top_ids: _Optional[_Iterable[int]] = ..., score_top_logprobs: _Optional[_Iterable[float]] = ..., status: _Optional[str] = ..., message: _Optional[str] = ..., proposed: _Optional[_Iterable[int]] = ..., proposed_logprobs: _Optional[_Iterable[float]] = ..., ended: _Optional[bool] = ..., end_logprob: _Optional[float] = ..., score_rows: _Optional[_Union[Tensor, _Mapping]] = ..., open_top_ids: _Optional[_Iterable[int]] = ..., open_top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class MemberBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[MemberRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[MemberRequest, _Mapping]]] = ...) -> None: ...

class MemberBatchReply(_message.Message):
    __slots__ = ("replies",)
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[MemberReply]
    def __init__(self, replies: _Optional[_Iterable[_Union[MemberReply, _Mapping]]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("seq", "method", "body", "mac", "status", "message")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    method: str
    body: bytes
    mac: str
    status: str
    message: str
    def __init__(self, seq: _Optional[int] = ..., method: _Optional[str] = ..., body: _Optional[bytes] = ..., mac: _Optional[str] = ..., status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
