from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertId(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("fingerprint", "hosted", "device", "capacity_bytes", "expert_bytes", "version", "num_layers", "num_experts", "hidden_size", "slots_per_layer", "expert_format", "max_tokens", "own_checkpoint", "disk_bytes", "max_slots_per_layer")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HOSTED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OWN_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SLOTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    hosted: _containers.RepeatedCompositeFieldContainer[ExpertId]
    device: str
    capacity_bytes: int
    expert_bytes: int
    version: str
    num_layers: int
    num_experts: int
    hidden_size: int
    slots_per_layer: int
    expert_format: str
    max_tokens: int
    own_checkpoint: bool
    disk_bytes: int
    max_slots_per_layer: int
    def __init__(self, fingerprint: _Optional[str] = ..., hosted: _Optional[_Iterable[_Union[ExpertId, _Mapping]]] = ..., device: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., expert_bytes: _Optional[int] = ..., version: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., hidden_size: _Optional[int] = ..., slots_per_layer: _Optional[int] = ..., expert_format: _Optional[str] = ..., max_tokens: _Optional[int] = ..., own_checkpoint: _Optional[bool] = ..., disk_bytes: _Optional[int] = ..., max_slots_per_layer: _Optional[int] = ...) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("config_json", "format", "expert_bytes")
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_FIELD_NUMBER: _ClassVar[int]
    config_json: str
    format: ExpertFormat
    expert_bytes: int
    def __init__(self, config_json: _Optional[str] = ..., format: _Optional[_Union[ExpertFormat, _Mapping]] = ..., expert_bytes: _Optional[int] = ...) -> None: ...

class ExpertFormat(_message.Message):
    __slots__ = ("kind", "dtype", "bits", "group_size", "version", "axis", "packing", "meta_dtype")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    META_DTYPE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    dtype: str
    bits: int
    group_size: int
    version: int
    axis: int
    packing: str
    meta_dtype: str
    def __init__(self, kind: _Optional[str] = ..., dtype: _Optional[str] = ..., bits: _Optional[int] = ..., group_size: _Optional[int] = ..., version: _Optional[int] = ..., axis: _Optional[int] = ..., packing: _Optional[str] = ..., meta_dtype: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("fingerprint", "description", "experts", "slots_per_layer", "policy")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    description: ModelDescription
    experts: _containers.RepeatedCompositeFieldContainer[ExpertId]
    slots_per_layer: int
    policy: str
    def __init__(self, fingerprint: _Optional[str] = ..., description: _Optional[_Union[ModelDescription, _Mapping]] = ..., experts: _Optional[_Iterable[_Union[ExpertId, _Mapping]]] = ..., slots_per_layer: _Optional[int] = ..., policy: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("missing", "held_bytes", "slots_per_layer")
    MISSING_FIELD_NUMBER: _ClassVar[int]
    HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    missing: _containers.RepeatedCompositeFieldContainer[ExpertId]
    held_bytes: int
    slots_per_layer: int
    def __init__(self, missing: _Optional[_Iterable[_Union[ExpertId, _Mapping]]] = ..., held_bytes: _Optional[int] = ..., slots_per_layer: _Optional[int] = ...) -> None: ...

class ExpertChunk(_message.Message):
    __slots__ = ("fingerprint", "expert", "offset", "data", "sha256")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    expert: ExpertId
    offset: int
    data: bytes
    sha256: str
    def __init__(self, fingerprint: _Optional[str] = ..., expert: _Optional[_Union[ExpertId, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("experts", "bytes")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    experts: int
    bytes: int
    def __init__(self, experts: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("id", "run", "prefetch")
    ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    id: int
    run: RunExpertsRequest
    prefetch: PrefetchRequest
    def __init__(self, id: _Optional[int] = ..., run: _Optional[_Union[RunExpertsRequest, _Mapping]] = ..., prefetch: _Optional[_Union[PrefetchRequest, _Mapping]] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("id", "run", "code", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    run: RunExpertsResponse
    code: int
    message: str
    def __init__(self, id: _Optional[int] = ..., run: _Optional[_Union[RunExpertsResponse, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("fingerprint", "experts")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertId]
    def __init__(self, fingerprint: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertId, _Mapping]]] = ...) -> None: ...

class AssignResponse(_message.Message):
    __slots__ = ("hosted",)
    HOSTED_FIELD_NUMBER: _ClassVar[int]
    hosted: _containers.RepeatedCompositeFieldContainer[ExpertId]
    def __init__(self, hosted: _Optional[_Iterable[_Union[ExpertId, _Mapping]]] = ...) -> None: ...

class RunExpertsRequest(_message.Message):
    __slots__ = ("fingerprint", "layer", "experts", "counts", "hidden", "prefetch_layer", "prefetch_experts")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_LAYER_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    prefetch_layer: int
    prefetch_experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, fingerprint: _Optional[str] = ..., layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., prefetch_layer: _Optional[int] = ..., prefetch_experts: _Optional[_Iterable[int]] = ...) -> None: ...

class RunExpertsResponse(_message.Message):
    __slots__ = ("output", "hits", "misses")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    hits: int
    misses: int
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("fingerprint", "layer", "experts")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, fingerprint: _Optional[str] = ..., layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("issued",)
    ISSUED_FIELD_NUMBER: _ClassVar[int]
    issued: int
    def __init__(self, issued: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("requests", "tokens", "hits", "misses", "prefetch_issued", "prefetch_used", "bytes_loaded", "busy_s", "errors")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_ISSUED_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_USED_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOADED_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    tokens: int
    hits: int
    misses: int
    prefetch_issued: int
    prefetch_used: int
    bytes_loaded: int
    busy_s: float
    errors: int
    def __init__(self, requests: _Optional[int] = ..., tokens: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., prefetch_issued: _Optional[int] = ..., prefetch_used: _Optional[int] = ..., bytes_loaded: _Optional[int] = ..., busy_s: _Optional[float] = ..., errors: _Optional[int] = ...) -> None: ...
