"""The CUDA compute form of packed weights: torch's tinygemm int4 kernel (`aten._weight_int4pack_mm`).

The same kernel torchao's int4 layout and hqq's torchao backend call, shipped in torch itself. HQQ's
w = (q - zero) * scale is tinygemm's w = (q - 8) * scale + zero' with zero' = (8 - zero) * scale, so 4-bit codes
(and 3- and 2-bit ones, whose values fit) map exactly. It takes groups of 32 to 256 and bfloat16
activations; other shapes keep the reference path (dequantize per call). A new GPU or torch release is checked
once per shape against the reference before it is trusted (`TinyGemm.verified`). It knows nothing about
slots, stores or models.
"""
from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

# N = output features, K = input features, G = groups per row

GROUPS = (32, 64, 128, 256)


def available(device: torch.device) -> bool:
    return device.type == "cuda" and hasattr(torch.ops.aten, "_weight_int4pack_mm") and \
        torch.cuda.get_device_capability(device) >= (8, 0)


def _inner_tiles(in_features: int) -> int:
    return 8 if in_features % 128 == 0 else 4 if in_features % 64 == 0 else 2


def operands(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out_features: int,
             in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's codes, scales and zeros as tinygemm's inputs: codes two a byte [N, K / 2] (even inputs in the high
    nibble) and (scale, zero') pairs [K / g, N, 2] with zero' = (8 - zero) * scale."""
    q = codes.reshape(out_features, in_features).to(torch.uint8)
    pairs = ((q[:, ::2] << 4) | q[:, 1::2]).contiguous()
    s = scale.float().view(out_features, -1)
    z = (8.0 - zero.float().view(out_features, -1)) * s
    return pairs, torch.stack([s, z], dim=-1).transpose(0, 1).contiguous()


class TinyGemm:
    """Fills and multiplies tensors whose codes fit in 4 bits, on one CUDA device."""

    name = "tinygemm"

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def supports(bits: int, out_features: int, in_features: int, group: int) -> bool:
        return bits <= 4 and group in GROUPS and in_features % group == 0 and in_features % 32 == 0 \
            and out_features % 8 == 0

    @staticmethod
    def specs(name: str, out_features: int, in_features: int, group: int) -> dict:
        """Layout entries of one tensor's compute form: the packed int4 tiles and bf16 (scale, zero') pairs."""
        tiles = _inner_tiles(in_features)
        packed = (out_features // 8, in_features // (tiles * 16), 32, tiles // 2)
        return {f"{name}.w4": (torch.int32, packed),
                f"{name}.sz": (torch.bfloat16, (in_features // group, out_features, 2))}

    def fill(self, name: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out_features: int,
             in_features: int, group: int, views: dict[str, torch.Tensor]) -> None:
        """codes [N * K] natural order, scale and zero [N * K / g] (float16) -> the tensor's compute form."""
        pairs, sz = operands(codes, scale, zero, out_features, in_features)
        views[f"{name}.w4"].copy_(torch.ops.aten._convert_weight_to_int4pack(pairs, _inner_tiles(in_features)))
        views[f"{name}.sz"].copy_(sz)

    @staticmethod
    def linear(name: str, views: dict[str, torch.Tensor], x: torch.Tensor, group: int) -> torch.Tensor:
        """x [S, K] -> [S, N] in bfloat16."""
        return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), views[f"{name}.w4"], group,
                                                  views[f"{name}.sz"])

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one instance per device, shapes are few
    def verified(self, out_features: int, in_features: int, group: int) -> bool:
        """Whether tinygemm on this GPU gives the reference's products for this shape (random codes, one
        check per shape and process); on a mismatch the reference path is used, with a warning."""
        from .layout import PackedLayout

        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (out_features * in_features,), generator=gen, dtype=torch.uint8)
        groups = out_features * in_features // group
        scale = (torch.rand(groups, generator=gen) * 0.01 + 0.001).half()
        zero = (torch.rand(groups, generator=gen) * 15).half()
        x = torch.randn(3, in_features, generator=gen)
        w = ((codes.view(groups, group).float() - zero.float()[:, None]) * scale.float()[:, None])
        w = w.view(out_features, in_features).double()
        expected = x.double() @ w.t()
        try:
            layout = PackedLayout(self.specs("w", out_features, in_features, group))
            buf = layout.empty(self.device)
            views = layout.views(buf)
            self.fill("w", codes.to(self.device), scale.to(self.device), zero.to(self.device), out_features,
                      in_features, group, views)
            got = self.linear("w", views, x.to(self.device), group).double().cpu()
        except RuntimeError as exc:
            logger.warning("tinygemm int4 failed on %s for [%d, %d] g%d (%s): dequantizing per call instead",
                           self.device, out_features, in_features, group, exc)
            return False
        bound = 2.0**-7 * (x.abs().double() @ w.abs().t()) + 1e-3  # bf16 activations, bf16 scales
        ok = bool(((got - expected).abs() <= bound).all())
        if not ok:
            logger.warning("tinygemm int4 on %s disagrees with the reference for [%d, %d] g%d: dequantizing per "
                           "call instead", self.device, out_features, in_features, group)
        return ok
