"""To and from the wire: tensors (raw little-endian bytes + dtype + shape, checked on the way in) and the
domain objects that both sides of a call share (`WorkerInfo`, `WorkerStats`).

Only this module (with the servicer and the client) touches generated message classes. Nothing is
ever unpickled: a tensor is rebuilt from its bytes after its dtype, shape and length are validated.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass

import torch

from ..offload_core.experts import ExpertKey
from . import expert_pb2 as pb

WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
MAX_DIMS = 8  # a tensor on the wire has at most this many dimensions (ours have 2)


def quote(value, limit: int = 48) -> str:
    """A client-supplied value for a message or a log line: repr'd (no raw newlines), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text) - limit} more characters)"

if sys.byteorder != "little":  # the wire format is little-endian; we never silently byte-swap
    raise ImportError("moeshard's wire format needs a little-endian host")


class WireError(ValueError):
    """A message that does not describe a valid tensor; the text says what was expected."""


def tensor_to_pb(t: torch.Tensor) -> pb.Tensor:
    if t.dtype not in _NAMES:
        raise WireError(f"dtype {t.dtype} cannot be sent: expected one of {sorted(WIRE_DTYPES)}")
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t  # numpy has no bf16
    return pb.Tensor(data=raw.numpy().tobytes(), dtype=_NAMES[t.dtype], shape=list(t.shape))


def tensor_from_pb(msg: pb.Tensor, *, max_elements: int, name: str = "tensor") -> torch.Tensor:
    """Rebuild a tensor, refusing unknown dtypes, negative or huge shapes and a byte length that disagrees."""
    dtype = WIRE_DTYPES.get(msg.dtype)
    if dtype is None:
        raise WireError(f"{name}.dtype {quote(msg.dtype)} is not allowed: expected one of {sorted(WIRE_DTYPES)}")
    if len(msg.shape) > MAX_DIMS:
        raise WireError(f"{name}.shape has {len(msg.shape)} dimensions: expected at most {MAX_DIMS}")
    shape = list(msg.shape)
    if any(s < 0 for s in shape):
        raise WireError(f"{name}.shape {shape} has a negative dimension")
    numel = math.prod(shape)
    # Zero dimensions do not make a huge shape harmless (torch still computes its strides).
    if math.prod(max(s, 1) for s in shape) > max_elements:
        raise WireError(f"{name}.shape {shape} is larger than the limit of {max_elements} elements")
    itemsize = dtype.itemsize
    if len(msg.data) != numel * itemsize:
        raise WireError(f"{name} carries {len(msg.data)} bytes, expected {numel * itemsize} for shape {shape} "
                        f"of {msg.dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).view(shape)


AUTH_METADATA_KEY = "authorization"  # gRPC metadata keys are lower-case


def bearer(token: str) -> str:
    return f"Bearer {token}"


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker says about itself (InfoResponse): the worker builds one, the coordinator reads one."""

    fingerprint: str  # model + expert format; a coordinator with another one is refused
    hosted: frozenset[ExpertKey]
    device: str
    capacity_bytes: int  # memory this worker may use for hosted experts
    expert_bytes: int  # bytes of one packed expert
    version: str
    num_layers: int
    num_experts: int
    hidden_size: int
    slots_per_layer: int
    expert_format: str  # e.g. "dense float32", "hqq 2-bit g16 (bfloat16)"
    max_tokens: int  # most rows one RunExperts may carry
    own_checkpoint: bool = False  # started with --model: serves that model only, receives no experts
    disk_bytes: int = 0  # disk it may use for received experts (0: no limit given)
    max_slots_per_layer: int = 0  # its --slots-per-layer, a cap on what a coordinator asks (0: none)

    @property
    def waiting(self) -> bool:
        """A worker without a model yet: it waits for a coordinator to join it and push its experts."""
        return not self.fingerprint

    def to_pb(self) -> pb.InfoResponse:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "hosted"}
        return pb.InfoResponse(hosted=[pb.ExpertId(layer=k.layer, expert=k.expert) for k in sorted(self.hosted)],
                               **fields)

    @classmethod
    def from_pb(cls, msg: pb.InfoResponse) -> WorkerInfo:
        fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(cls) if f.name != "hosted"}
        return cls(hosted=frozenset(ExpertKey(e.layer, e.expert) for e in msg.hosted), **fields)


@dataclass(frozen=True)
class WorkerStats:
    """A worker's counters since it started (StatsResponse)."""

    requests: int = 0
    tokens: int = 0
    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    bytes_loaded: int = 0
    busy_s: float = 0.0
    errors: int = 0

    def to_pb(self) -> pb.StatsResponse:
        return pb.StatsResponse(**dataclasses.asdict(self))

    @classmethod
    def from_pb(cls, msg: pb.StatsResponse) -> WorkerStats:
        return cls(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)})


def model_description(config_dict: dict, fmt) -> dict:
    """What a worker without the checkpoint needs to compute a model's experts, as a coordinator's Join carries
    it (`description_to_pb`): its config.json and the packed expert format (and its size, a check that both sides
    pack alike)."""
    return {"config": config_dict, "format": fmt.describe(), "expert_bytes": fmt.layout.nbytes}


_HQQ_FIELDS = ("version", "bits", "group_size", "axis", "packing", "meta_dtype")


def description_to_pb(description: dict) -> pb.ModelDescription:
    fmt = description["format"]
    msg = pb.ModelDescription(config_json=json.dumps(description["config"], sort_keys=True),
                              expert_bytes=int(description["expert_bytes"]))
    msg.format.kind, msg.format.dtype = str(fmt["format"]), str(fmt["dtype"])
    if fmt["format"] == "hqq":
        for name in _HQQ_FIELDS:
            setattr(msg.format, name, fmt[name])
    return msg


def description_from_pb(msg: pb.ModelDescription) -> dict:
    """The description a Join carries, as `model_description` makes it. Raises `WireError` when its config is not a
    JSON object (what is in it is the worker's to check)."""
    try:
        config = json.loads(msg.config_json)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"the model description's config is not valid JSON ({quote(str(exc), 120)}): expected a "
                        "model's config.json") from None
    if not isinstance(config, dict):
        raise WireError("the model description's config is not a JSON object: expected a model's config.json")
    fmt = msg.format
    described = {"format": fmt.kind, "dtype": fmt.dtype}
    if fmt.kind == "hqq":
        described.update({name: getattr(fmt, name) for name in _HQQ_FIELDS})
    return {"config": config, "format": described, "expert_bytes": msg.expert_bytes}
