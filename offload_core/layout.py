"""One expert = one contiguous byte buffer: `PackedLayout` places named tensors at aligned offsets in a uint8
buffer and gives typed views back, of one buffer or, strided, of a layer's whole slab of slots. Every expert
format (`formats.DenseFormat`, `quant.HQQExpertFormat`) describes its buffers with one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import dtype_name

_ALIGN = 64  # bytes; keeps every view aligned for vectorised kernels and bf16/fp32 reinterpretation


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class PackedLayout:
    """Where each named tensor lives inside an expert's byte buffer."""

    def __init__(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        entries, offset = [], 0
        for name, (dtype, shape) in specs.items():
            entry = TensorEntry(name, dtype, tuple(int(s) for s in shape), offset)
            entries.append(entry)
            offset += -(-entry.nbytes // _ALIGN) * _ALIGN
        self.entries: tuple[TensorEntry, ...] = tuple(entries)
        self.nbytes: int = max(offset, _ALIGN)

    def empty(self, device: torch.device | str = "cpu", pin_memory: bool = False) -> torch.Tensor:
        return torch.empty(self.nbytes, dtype=torch.uint8, device=device, pin_memory=pin_memory)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into one expert's `buf` (no copy)."""
        return {e.name: buf[e.offset: e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries}

    def stacked_views(self, slab: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed [n, ...] views across a slab of n buffers [n, nbytes]: strided, so nothing is copied."""
        n = slab.shape[0]
        out = {}
        for e in self.entries:
            flat = slab[:, e.offset: e.offset + e.nbytes].view(e.dtype)  # [n, numel], row stride nbytes/itemsize
            out[e.name] = flat.view(n, *e.shape)
        return out

    def pack(self, tensors: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Copy `tensors` into `out` (a buffer of `nbytes`); shapes must match the layout."""
        for e, view in zip(self.entries, self.views(out).values()):
            src = tensors[e.name]
            if tuple(src.shape) != e.shape:
                raise ValueError(f"expert tensor {e.name!r} has shape {list(src.shape)}, expected {list(e.shape)}")
            view.copy_(src.to(e.dtype))
        return out

    def describe(self) -> list:
        return [[e.name, dtype_name(e.dtype), list(e.shape), e.offset] for e in self.entries]
