"""Mixed HQQ quantization (Eliseev & Mazur 2023): attention modules and packed expert buffers.

`HQQExpertFormat` packs one quantized expert (bit-packed codes, scales,
zeros) into one byte buffer and dequantizes it on whatever device the buffer is on; `quantize_attention`
swaps a model's q/k/v/o projections for hqq's `HQQLinear`. The quantizer, bit packing and dequantization
are hqq's own; this module only lays their outputs out. It does no caching (see `quantized_cache.py`).
"""
from __future__ import annotations

import logging
import math

import torch
from hqq.core.quantize import HQQLinear, Quantizer, hqq_base_quant_config
from torch import nn

from .config import QuantConfig, dtype_name
from .experts import ExpertTensor
from .formats import PackedLayout

logger = logging.getLogger(__name__)

# hqq's packers split the code rows into 8/bits equal slices (3-bit packs 10 rows per int32 and pads).
_ROWS_MULTIPLE = {8: 1, 4: 2, 3: 1, 2: 4}
_FORMAT_VERSION = 2  # bump when the packed layout changes, so that old caches are rebuilt


def _weight_params(bits: int, group: int) -> dict:
    # axis=1: each group is `group` consecutive weights along the input dim, hqq's choice for quality.
    # (hqq's ATen kernel needs axis=0, but it is a separate CUDA build, absent from the hqq wheel.)
    return hqq_base_quant_config(nbits=bits, group_size=group, axis=1)["weight_quant_params"]


def _check_groupable(name: str, shape: tuple[int, ...], bits: int, group: int) -> int:
    numel = math.prod(shape)
    if numel % group:
        raise ValueError(f"tensor {name!r} of shape {list(shape)} has {numel} weights, not a multiple of group {group}")
    rows = numel // group
    if rows % _ROWS_MULTIPLE[bits]:
        raise ValueError(f"tensor {name!r} of shape {list(shape)} splits into {rows} groups of {group}; {bits}-bit "
                         f"packing needs a multiple of {_ROWS_MULTIPLE[bits]}: choose another group size")
    return rows


class HQQExpertFormat:
    """One expert as hqq-quantized tensors in one buffer: `{name}.q` codes, `{name}.scale`, `{name}.zero`.

    Weights are quantized in [out, in] orientation (groups run along the input dim, hqq's choice for quality),
    so a transposed [in, out] weight (GPT-OSS) is quantized as its transpose and decoded back to [in, out].
    Biases stay in the compute dtype. Scales and zeros are kept in float16: hqq 0.2.8 ignores (and calls
    deprecated) quantized meta-data, so the paper's 8-bit scales are not available; that costs 32/group bits
    per weight (2-bit g16: 4.0 bits).
    """

    meta_dtype = torch.float16
    quantized = True

    def __init__(self, tensors: tuple[ExpertTensor, ...], bits: int, group_size: int, compute_dtype: torch.dtype,
                 quant_device: torch.device | str | None = None):
        if bits not in _ROWS_MULTIPLE:
            raise ValueError(f"expert bits must be one of {sorted(_ROWS_MULTIPLE)}, got {bits!r}")
        self.tensors = tuple(tensors)
        self.bits, self.group_size = bits, group_size
        self.dtype = compute_dtype  # what decode() returns, as DenseFormat.dtype
        # Where encode() runs hqq's optimiser: None = where the weights are (a GPU makes building far faster).
        self.quant_device = torch.device(quant_device) if quant_device is not None else None
        self._params = _weight_params(bits, group_size)
        self._packing = Quantizer.bit_to_packing[bits]
        code_dtype = Quantizer.unpack_view_dtype[self._packing]
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for t in self.tensors:
            if t.is_bias:
                specs[t.name] = (compute_dtype, t.shape)
                continue
            rows = _check_groupable(t.name, t.shape, bits, group_size)
            code_rows = -(-rows // 10) if bits == 3 else rows * bits // 8
            specs[f"{t.name}.q"] = (code_dtype, (code_rows, group_size))
            specs[f"{t.name}.scale"] = (self.meta_dtype, (rows, 1))
            specs[f"{t.name}.zero"] = (self.meta_dtype, (rows, 1))
        self.layout = PackedLayout(specs)

    @property
    def num_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors if not t.is_bias)

    @property
    def bits_per_param(self) -> float:
        """Bits per weight as stored and moved: codes, float16 scales and zeros, biases and alignment padding."""
        return self.layout.nbytes * 8 / self.num_params

    def describe(self) -> dict:
        """What the bytes mean, and the dtype computed in: backends that share a fingerprint give equal outputs."""
        return {"format": "hqq", "version": _FORMAT_VERSION, "bits": self.bits, "group_size": self.group_size,
                "axis": 1, "packing": self._packing, "meta_dtype": "float16", "dtype": dtype_name(self.dtype)}

    @property
    def label(self) -> str:
        return f"hqq {self.bits}-bit g{self.group_size} ({dtype_name(self.dtype)})"

    def encode(self, weights: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Quantize one expert's dense weights with hqq and pack codes and meta-data into `out`."""
        packed = {}
        for t in self.tensors:
            w = weights[t.name]
            if tuple(w.shape) != t.shape:
                raise ValueError(f"expert tensor {t.name!r} has shape {list(w.shape)}, expected {list(t.shape)}")
            if t.is_bias:
                packed[t.name] = w
                continue
            device = self.quant_device or w.device
            w = w.t() if t.transposed else w  # quantize [out, in]
            codes, meta = Quantizer.quantize(w.contiguous().to(device), device=device, **self._params)
            packed.update({f"{t.name}.q": codes, f"{t.name}.scale": meta["scale"], f"{t.name}.zero": meta["zero"]})
        return self.layout.pack(packed, out)

    def _dequant_dtype(self, device: torch.device) -> torch.dtype:
        # bf16 keeps 8 significant bits: `code - zero` near 255 (8-bit) would lose up to half a step. fp16
        # keeps it within 1/16 step and is fast on accelerators; CPUs do fp32 faster than fp16.
        if self.dtype in (torch.float32, torch.float16):
            return self.dtype
        return torch.float32 if device.type == "cpu" else torch.float16

    def decode(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense weights in the compute dtype, dequantized by hqq on `buf`'s device."""
        views = self.layout.views(buf)
        dtype = self._dequant_dtype(buf.device)
        weights = {}
        for t in self.tensors:
            if t.is_bias:
                weights[t.name] = views[t.name]
                continue
            shape = t.shape[::-1] if t.transposed else t.shape
            meta = {"nbits": self.bits, "group_size": self.group_size, "shape": torch.Size(shape), "axis": 1,
                    "packing": self._packing, "view_as_float": False, "compute_dtype": dtype,
                    "scale": views[f"{t.name}.scale"].to(dtype), "zero": views[f"{t.name}.zero"].to(dtype)}
            w = Quantizer.dequantize(views[f"{t.name}.q"], meta).to(self.dtype)
            weights[t.name] = w.t() if t.transposed else w
        return weights


def attention_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) for every nn.Linear directly under a `*.self_attn` module."""
    found = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "self_attn":
            found += [(module, child_name, child) for child_name, child in module.named_children()
                      if isinstance(child, nn.Linear)]
    return found


def quantize_attention(model: nn.Module, cfg: QuantConfig, device: torch.device | str) -> int:
    """Replace the attention projections of a materialised model by hqq `HQQLinear`s on `device`.

    Embeddings, norms, routers and the LM head are left as they are. Returns how many modules were
    replaced (0 when `cfg.attn_bits` is 16).
    """
    if not cfg.attention_quantized:
        return 0
    device = torch.device(device)
    targets = attention_linears(model)
    quant_config = hqq_base_quant_config(nbits=cfg.attn_bits, group_size=cfg.attn_group, axis=1)
    for parent, attr, linear in targets:
        if linear.weight.is_meta:
            raise ValueError(f"attention weights of {type(parent).__name__}.{attr} are on the meta device: "
                             "load the dense weights before quantizing")
        _check_groupable(attr, tuple(linear.weight.shape), cfg.attn_bits, cfg.attn_group)
        # hqq quantizes on `device` and keeps meta-data in the module's own dtype.
        setattr(parent, attr, HQQLinear(linear, quant_config, del_orig=True, compute_dtype=linear.weight.dtype,
                                        device=device))
    logger.info("quantized %d attention projections to %d-bit (group %d) with hqq on %s", len(targets),
                cfg.attn_bits, cfg.attn_group, device)
    return len(targets)
