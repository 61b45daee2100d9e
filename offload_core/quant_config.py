"""Quantization settings (no hqq import here: the worker and CLI parse settings without loading hqq)."""
from __future__ import annotations

from dataclasses import dataclass

ALLOWED_BITS = (16, 8, 4, 3, 2)  # 16 = not quantized (kept in the compute dtype)
# The paper's expert groups: 2-bit needs small groups to stay usable; 3-bit and up use 64.
DEFAULT_EXPERT_GROUP = {2: 16, 3: 64, 4: 64, 8: 64}


@dataclass(frozen=True)
class QuantConfig:
    attn_bits: int = 16  # q/k/v/o projections; the paper uses 4
    attn_group: int = 64  # weights sharing one (scale, zero) pair in attention; the paper uses 64
    expert_bits: int = 16  # expert FFN weights; the paper uses 3 or 2
    expert_group: int | None = None  # None = the paper's group for expert_bits (2-bit: 16, 3/4/8-bit: 64)

    def __post_init__(self):
        for field, bits in (("attn_bits", self.attn_bits), ("expert_bits", self.expert_bits)):
            if bits not in ALLOWED_BITS:
                raise ValueError(f"{field} must be one of {list(ALLOWED_BITS)} (16 = not quantized), got {bits!r}")
        for field, group in (("attn_group", self.attn_group), ("expert_group", self.expert_group)):
            # hqq's config builder accepts only multiples of 8.
            if group is not None and (not isinstance(group, int) or group <= 0 or group % 8):
                raise ValueError(f"{field} must be a positive multiple of 8 (e.g. 16, 64, 128), got {group!r}")

    @property
    def attention_quantized(self) -> bool:
        return self.attn_bits < 16

    @property
    def experts_quantized(self) -> bool:
        return self.expert_bits < 16

    @property
    def expert_group_size(self) -> int | None:
        """The group actually used for experts (None when they are not quantized)."""
        if not self.experts_quantized:
            return None
        return self.expert_group or DEFAULT_EXPERT_GROUP[self.expert_bits]

    def describe(self) -> dict:
        """Settings that change results, for fingerprints and manifests (groups of 16-bit parts are moot)."""
        return {
            "attn_bits": self.attn_bits,
            "attn_group": self.attn_group if self.attention_quantized else None,
            "expert_bits": self.expert_bits,
            "expert_group": self.expert_group_size,
        }

