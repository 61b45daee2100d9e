"""One expert = one contiguous byte buffer, so that one copy moves one expert between tiers.

`PackedLayout` places named tensors at aligned offsets in a uint8 buffer and gives typed views back.
`DenseFormat` is the unquantized expert format (the checkpoint's tensors in the compute dtype); the
quantized formats live in `quant.py` and expose the same three methods.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_ALIGN = 64  # bytes; keeps every view aligned for vectorised kernels and bf16/fp32 reinterpretation


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


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
        """Typed views into `buf` (no copy)."""
        return {
            e.name: buf[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries
        }

    def pack(self, tensors: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Copy `tensors` into `out` (a buffer of `nbytes`); shapes and dtypes must match the layout."""
        for e, view in zip(self.entries, self.views(out).values()):
            src = tensors[e.name]
            if tuple(src.shape) != e.shape:
                raise ValueError(f"expert tensor {e.name!r} has shape {list(src.shape)}, expected {list(e.shape)}")
            view.copy_(src.to(e.dtype))
        return out


class DenseFormat:
    """Experts kept in a floating-point dtype (no quantization): bit-exact with transformers."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype):
        self.dtype = dtype
        self.layout = PackedLayout({name: (dtype, shape) for name, shape in shapes.items()})

    def describe(self) -> dict:
        return {"format": "dense", "dtype": str(self.dtype).removeprefix("torch.")}

    def encode(self, weights: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        return self.layout.pack(weights, out)

    def decode(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.views(buf)
