"""Tensors to and from the wire: raw little-endian bytes + dtype + shape, checked on the way in.

Only this module (with the servicer and the client) touches generated message classes. Nothing is
ever unpickled: a tensor is rebuilt from its bytes after its dtype, shape and length are validated.
"""
from __future__ import annotations

import math
import sys

import torch

from . import expert_pb2 as pb

WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {v: k for k, v in WIRE_DTYPES.items()}

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
        raise WireError(f"{name}.dtype {msg.dtype!r} is not allowed: expected one of {sorted(WIRE_DTYPES)}")
    shape = list(msg.shape)
    if any(s < 0 for s in shape):
        raise WireError(f"{name}.shape {shape} has a negative dimension")
    numel = math.prod(shape)
    # Zero dimensions do not make a huge shape harmless (torch still computes its strides).
    if math.prod(max(s, 1) for s in shape) > max_elements:
        raise WireError(f"{name}.shape {shape} is larger than the limit of {max_elements} elements")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != numel * itemsize:
        raise WireError(f"{name} carries {len(msg.data)} bytes, expected {numel * itemsize} for shape {shape} "
                        f"of {msg.dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).view(shape)


AUTH_METADATA_KEY = "authorization"  # gRPC metadata keys are lower-case


def bearer(token: str) -> str:
    return f"Bearer {token}"
