"""Expert formats: how an expert's tensors are packed into one contiguous byte buffer (a `layout.PackedLayout`),
so that one copy moves one expert between tiers. `DenseFormat` is the unquantized expert
format (the checkpoint's tensors in the compute dtype); the quantized format lives in `quant.py` and
exposes the same methods: a storage form (`layout`: what stores, caches and the wire hold), a compute form
(`compute_layout`: what a slot holds, filled by `fill`), and `forward` / `forward_grouped` over slots.
`expert_format` picks one from the settings.
"""
from __future__ import annotations

import torch

from .config import QuantConfig, dtype_name
from .experts import ExpertMath, ExpertTensor, grouped_supported
from .layout import PackedLayout
from .quant import HQQExpertFormat, compute_kernels

__all__ = ["DenseFormat", "PackedLayout", "expert_format"]


SPARSE_SPAN = 8  # a grouped call spanning more slots than this many per expert computed runs one call per expert


class DenseFormat:
    """Experts kept in a floating-point dtype (no quantization): bit-exact with transformers."""

    quantized = False
    compute = "dense"  # how slots are computed (see HQQExpertFormat.compute)

    def __init__(self, tensors: tuple[ExpertTensor, ...], dtype: torch.dtype):
        self.tensors, self.dtype = tuple(tensors), dtype
        self.layout = PackedLayout({t.name: (dtype, t.shape) for t in self.tensors})
        self.compute_layout = self.layout  # a slot holds the dense weights themselves

    def describe(self) -> dict:
        return {"format": "dense", "dtype": dtype_name(self.dtype)}

    @property
    def label(self) -> str:
        return f"dense {dtype_name(self.dtype)}"

    def encode(self, weights: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        return self.layout.pack(weights, out)

    def encode_many(self, experts: list[dict[str, torch.Tensor]], outs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.encode(w, out) for w, out in zip(experts, outs)]

    def decode(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.views(buf)

    def fill(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(src)

    def grouped(self, device: torch.device) -> bool:
        return grouped_supported(device, self.dtype)

    def forward(self, math: ExpertMath, buf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [t, D] through the expert in `buf`, in the compute dtype."""
        return math.forward(self.decode(buf), x.to(self.dtype))

    def forward_grouped(self, math: ExpertMath, slab: torch.Tensor, index: list[int], counts: list[int],
                        x: torch.Tensor) -> torch.Tensor:
        """Rows `x` [S, D] grouped by expert, `counts[i]` of them for the expert in slot `index[i]` of `slab`:
        one grouped matmul per projection over strided views of the slots (nothing is copied), over the rows from the
        first slot used to the last. A grouped matmul pays for every group in that span, empty or not: where a
        cache shared by every layer scatters a layer's experts over a large slab, one call per expert is cheaper."""
        lo, hi = index[0], index[-1]  # ascending: the caller sorts the wave by slot
        if hi - lo + 1 > SPARSE_SPAN * len(index):
            return torch.cat([self.forward(math, slab[i], part) for i, part in zip(index, x.split(counts))])
        slab, index = slab[lo:hi + 1], [i - lo for i in index]
        k = slab.shape[0]
        per_slot = [0] * k
        for i, c in zip(index, counts):
            per_slot[i] = c
        # grouped_mm wants rows sorted by slot: `index` is ascending (the caller sorts the wave by slot)
        offsets = torch.tensor(per_slot, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(slab.device)  # [k]
        rows = torch.tensor(index, device=slab.device).repeat_interleave(
            torch.tensor(counts, device=slab.device))  # [S] slot of each row
        return math.forward_grouped(self.layout.stacked_views(slab), x.to(self.dtype), rows, offsets)


def expert_format(tensors: tuple[ExpertTensor, ...], cfg: QuantConfig, compute_dtype: torch.dtype,
                  quant_device: torch.device | str | None = None, device: torch.device | str | None = None):
    """The packed expert format for `cfg`: dense in the compute dtype at 16 bits, hqq otherwise. `device` is
    where slots are computed: it picks the compute form (moeshard's CPU kernels on a CPU); None = storage
    only (sizes, descriptions)."""
    if not cfg.experts_quantized:
        return DenseFormat(tensors, compute_dtype)
    kernels = compute_kernels(cfg, torch.device(device)) if device is not None else None
    return HQQExpertFormat(tensors, cfg.expert_bits, cfg.expert_group_size, compute_dtype, quant_device,
                           kernels=kernels)
