"""The host tier: where an expert waits when it is not in a device slot.

`CheckpointSource` reads one expert from the checkpoint and packs it (`QuantizedCacheSource` in
`quantized_cache.py` reads one already packed).
`RamStore` keeps packed experts in host RAM (pinned when CUDA is present), filled on first use;
`DiskStore` keeps nothing and reads from the source on every load, for machines with less RAM
than the model. Neither knows about slots or the device.
"""
from __future__ import annotations

import math
import threading
from typing import Protocol

import torch

from .checkpoint import Checkpoint
from .experts import ExpertKey
from .formats import DenseFormat


class ExpertSource(Protocol):
    """Where packed experts come from: `read_into` fills a buffer of `nbytes` with one packed expert."""

    nbytes: int

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None: ...


class CheckpointSource:
    """Reads one expert's tensors from the checkpoint through the family layout and packs them."""

    def __init__(self, ckpt: Checkpoint, layout, fmt):
        self.ckpt, self.layout, self.format = ckpt, layout, fmt
        self.nbytes: int = fmt.layout.nbytes
        self.dense_bytes: int = 4 * sum(math.prod(t.shape) for t in fmt.tensors)  # one expert in float32

    def read_many_into(self, keys: list[ExpertKey], outs: list[torch.Tensor]) -> None:
        """Several experts at once: quantized formats quantize them together (much faster than one by one)."""
        weights = [self.layout.read_expert(self.ckpt, k.layer, k.expert, self.format.dtype) for k in keys]
        self.format.encode_many(weights, outs)

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None:
        # Dense experts already in the compute dtype go from disk into `out` directly: no temporaries, so
        # the loader neither copies twice nor leaves freed buffers behind in the allocator.
        if isinstance(self.format, DenseFormat) and out.device.type == "cpu" and \
                self.layout.read_expert_into(self.ckpt, key.layer, key.expert, self.format.decode(out)):
            return
        self.format.encode(self.layout.read_expert(self.ckpt, key.layer, key.expert, self.format.dtype), out)


class RamStore:
    """Packed experts in host RAM, one contiguous (pinned) buffer each, read from the source once."""

    kind = "ram"

    def __init__(self, source: ExpertSource, pin_memory: bool = False):
        self.source, self.pin_memory = source, pin_memory
        self.nbytes = source.nbytes
        self._buffers: dict[ExpertKey, torch.Tensor] = {}
        self._lock = threading.Lock()

    def host_buffer(self, key: ExpertKey) -> torch.Tensor:
        with self._lock:
            buf = self._buffers.get(key)
            if buf is None:
                buf = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
                self.source.read_into(key, buf)
                self._buffers[key] = buf
            return buf

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None:
        out.copy_(self.host_buffer(key))

    def retain(self, keys) -> None:
        """Drop every buffer whose key is not in `keys` (a worker given a new assignment)."""
        keep = set(keys)
        with self._lock:
            for key in [k for k in self._buffers if k not in keep]:
                del self._buffers[key]

    @property
    def resident_bytes(self) -> int:
        return len(self._buffers) * self.nbytes


class DiskStore:
    """No host copy: every load reads the expert from the source (the page cache may still keep it)."""

    kind = "disk"

    def __init__(self, source: ExpertSource):
        self.source = source
        self.nbytes = source.nbytes

    def host_buffer(self, key: ExpertKey) -> None:
        return None

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None:
        self.source.read_into(key, out)

    def retain(self, keys) -> None:
        pass

    resident_bytes = 0
