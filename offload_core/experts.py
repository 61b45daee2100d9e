"""What an expert is, for every family: its key, its tensors, and its arithmetic, written once.

transformers' experts decorator (`use_experts_implementation`) gives every decorated experts module the
flags its arithmetic needs (`has_gate`, `has_bias`, `is_transposed`, `is_concatenated`) plus `act_fn` and
`_apply_gate` (GPT-OSS's clamped SwiGLU is its `_apply_gate`); transformers' own batched/grouped
implementations read only those, and so does `ExpertMath` here. A family is data: nothing in this module
names one. It knows nothing about checkpoints, caches or the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

# t = tokens routed to one expert, S = rows of a grouped call, n = experts (slots) of a grouped call,
# D = hidden size, I = expert intermediate size


class ExpertKey(NamedTuple):
    layer: int
    expert: int


class NonFiniteOutput(ValueError):
    """An expert turned finite inputs into NaN or Inf (activations beyond the dtype's range): an error naming
    the layer and expert, never silent garbage in the residual stream."""


def check_finite(layer: int, outputs: dict[int, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Raise `NonFiniteOutput` naming the experts of `layer` whose outputs hold NaN or Inf."""
    if not outputs:
        return
    flags = torch.stack([torch.isfinite(out).all() for out in outputs.values()]).tolist()  # one host sync
    bad = [e for e, ok in zip(outputs, flags) if not ok]
    if bad:
        where = ", ".join(f"expert {e}" for e in bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise NonFiniteOutput(f"layer {layer}: {where} produced NaN or Inf (activations beyond the range of "
                              f"{str(dtype or next(iter(outputs.values())).dtype).removeprefix('torch.')}?)")


@dataclass(frozen=True)
class ExpertTensor:
    """One tensor of one expert, named as moeshard packs it ("gate_up", "down", "gate_up_bias", ...)."""

    name: str
    param: str  # the experts module's fused parameter it comes from, e.g. "gate_up_proj"
    shape: tuple[int, ...]  # of one expert: the parameter's shape without its leading [E]
    transposed: bool = False  # weight stored [in, out] (GPT-OSS) instead of [out, in]

    @property
    def is_bias(self) -> bool:
        return len(self.shape) == 1


# moeshard's name for each experts-module parameter that the decorator's implementations read
PARAM_NAMES = {"gate_up_proj": "gate_up", "up_proj": "up", "down_proj": "down", "gate_up_proj_bias": "gate_up_bias",
               "up_proj_bias": "up_bias", "down_proj_bias": "down_bias"}


class ExpertMath:
    """The FFN of one expert, as the family's decorated experts module defines it.

    `module` is that experts module (its parameters may stay on the meta device: only its flags, `act_fn`
    and `_apply_gate` are used).
    """

    def __init__(self, module: torch.nn.Module):
        for flag in ("has_gate", "has_bias", "is_transposed"):
            if not hasattr(module, flag):
                raise ValueError(f"{type(module).__name__} is not a transformers experts module "
                                 "(no @use_experts_implementation flags)")
        if getattr(module, "has_post_expert_norm", False):
            raise ValueError(f"{type(module).__name__} applies a norm after each expert, which moeshard does not "
                             "support yet")
        self.has_gate, self.has_bias = bool(module.has_gate), bool(module.has_bias)
        self.is_transposed = bool(module.is_transposed)
        self.is_concatenated = bool(getattr(module, "is_concatenated", True))
        self.up = "gate_up" if self.has_gate else "up"
        self._gate: Callable = module._apply_gate if self.has_gate else module.act_fn
        self.family = type(module).__name__

    def describe(self) -> dict:
        """What changes the arithmetic: goes into the fingerprint, so a worker computes what the coordinator would."""
        return {"experts_class": self.family, "has_gate": self.has_gate, "has_bias": self.has_bias,
                "is_transposed": self.is_transposed, "is_concatenated": self.is_concatenated}

    def tensors(self, module: torch.nn.Module) -> tuple[ExpertTensor, ...]:
        """The per-expert tensors of `module`, in a fixed order (weights first, then biases)."""
        out = []
        for param, tensor in module.named_parameters(recurse=False):
            if param not in PARAM_NAMES:
                raise ValueError(f"{self.family} has parameter {param!r}, which moeshard's expert path does not know")
            shape = tuple(int(s) for s in tensor.shape[1:])
            out.append(ExpertTensor(PARAM_NAMES[param], param, shape, self.is_transposed and len(shape) == 2))
        return tuple(sorted(out, key=lambda t: (t.is_bias, t.name)))

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.is_transposed:  # weight [in, out]
            return torch.addmm(bias, x, weight) if bias is not None else x @ weight
        return F.linear(x, weight, bias)  # weight [out, in]

    def forward(self, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x [t, D] -> [t, D] through one expert's weights `w`."""
        h = self._linear(x, w[self.up], w.get(f"{self.up}_bias"))  # [t, 2I] (or [t, I] without a gate)
        return self._linear(self._gate(h), w["down"], w.get("down_bias"))

    def forward_with(self, linear: Callable[[str, torch.Tensor], torch.Tensor],
                     bias: Callable[[str], torch.Tensor | None], x: torch.Tensor) -> torch.Tensor:
        """The same FFN with the projections given as functions: `linear(name, h)` applies the expert weight
        `name` ([S, in] -> [S, out]), `bias(name)` is that bias per row ([S, out]) or None. For weights that are
        not plain matrices (packed codes computed by a kernel)."""
        h = linear(self.up, x)  # [S, 2I] (or [S, I] without a gate)
        if self.has_bias and (b := bias(f"{self.up}_bias")) is not None:
            h = h + b
        out = linear("down", self._gate(h))  # [S, D]
        if self.has_bias and (b := bias("down_bias")) is not None:
            out = out + b
        return out

    def forward_grouped(self, w: dict[str, torch.Tensor], x: torch.Tensor, slots: torch.Tensor,
                        offsets: torch.Tensor) -> torch.Tensor:
        """Rows `x` [S, D] sorted by slot, through experts stacked as `w[name]` [n, ...] (strided views of the
        slot buffers: nothing is copied); `offsets` [n] int32 ends each slot's rows, `slots` [S] gives each
        row's slot (for the biases). One grouped matmul per projection instead of one call per expert."""
        up = _grouped_linear(x, w[self.up], offsets, self.is_transposed)  # [S, 2I]
        if self.has_bias:
            up = up + w[f"{self.up}_bias"][slots]
        down = _grouped_linear(self._gate(up), w["down"], offsets, self.is_transposed)  # [S, D]
        if self.has_bias:
            down = down + w["down_bias"][slots]
        return down


def grouped_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `forward_grouped` runs here: torch's grouped matmul has a CPU kernel for every float dtype and a
    CUDA one for bf16 on sm80+ (the rules transformers' own grouped_mm implementation follows)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    # F.grouped_mm wants [n, in, out]; [out, in] weights are given transposed (a view, no copy).
    return F.grouped_mm(x, weight if transposed else weight.transpose(-2, -1), offs=offsets)
