"""Mixed HQQ quantization (Eliseev & Mazur 2023): packed expert buffers and packed attention projections.

An expert has two forms. The storage form (`HQQExpertFormat.layout`) is what the quantized cache, the host
store and the wire to workers hold: codes packed at their own width, float16 scales and zeros per group.
The compute form (`compute_layout`) is what a slot holds: on a CPU with moeshard's kernels the same bytes
(3-bit codes widened to 4-bit chunks when the slot is filled), computed by one fused
dequantize-and-multiply call for all the experts of a layer (`kernels.py`), never expanded to a dense matrix;
on a CUDA GPU (sm80+), torch's tinygemm int4 tiles (`cuda_int4.py`; 2-4-bit codes, groups of 32-256); elsewhere
(no C compiler, other shapes) the storage form, dequantized on each call (the reference path).
`PackedLinear` does the same for attention's q/k/v/o projections. Weights are quantized with HQQ's
proximal optimiser (run group by group in C; hqq's own `Quantizer` where the kernels are unavailable).
This module does no caching (see `quantized_cache.py`).
"""
from __future__ import annotations

import logging
import math
import torch
import torch.nn.functional as F
from torch import nn

from . import cuda_int4
from .config import QuantConfig, dtype_name
from .cuda_int4 import TinyGemm
from .experts import ExpertMath, ExpertTensor
from .layout import PackedLayout
from .kernels import CpuKernels, cpu_kernels, from_kernel_order, pack, packed_bytes, to_kernel_order, unpack

logger = logging.getLogger(__name__)

# S = rows of a grouped call, N = output features, K = input features, G = groups of a tensor

_FORMAT_VERSION = 3  # bump when the packed layout changes, so that old caches are rebuilt
META_PAD = 8  # zero float16s after each tensor's scales and zeros (the kernel loads eight groups' at a time)
SUPPORTED_BITS = (8, 4, 3, 2)
QUANTIZER_C, QUANTIZER_HQQ = "moeshard", "hqq"  # who chose the codes (part of the fingerprint, not of the layout)


def check_groupable(name: str, shape: tuple[int, ...], group: int) -> int:
    """Groups of a tensor: its weights, read flat, in groups of `group` (HQQ's axis 1)."""
    numel = math.prod(shape)
    if numel % group:
        raise ValueError(f"tensor {name!r} of shape {list(shape)} has {numel} weights, not a multiple of group {group}")
    return numel // group


def _code_specs(prefix: str, numel: int, bits: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    if bits == 3:  # a 2-bit plane of the low bits and a 1-bit plane of bit 2: exactly 3 bits a weight
        return {f"{prefix}.q2": (torch.uint8, (packed_bytes(numel, 2),)),
                f"{prefix}.q1": (torch.uint8, (packed_bytes(numel, 1),))}
    return {f"{prefix}.q": (torch.uint8, (packed_bytes(numel, bits),))}


class QuantizedTensor:
    """One weight quantized and packed: which [N, K] matrix it is (out, in), and how its buffer reads back."""

    def __init__(self, name: str, shape: tuple[int, ...], transposed: bool, bits: int, group: int):
        self.name, self.shape, self.transposed, self.bits, self.group = name, shape, transposed, bits, group
        self.out_features, self.in_features = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        self.numel = math.prod(shape)
        self.groups = check_groupable(name, shape, group)
        self.compute_bits = 4 if bits == 3 else bits  # slots hold 3-bit codes widened to 4-bit chunks

    def _meta_specs(self) -> dict:
        # META_PAD zeros after each: the kernel reads eight groups' scales at once, also at a row's end
        shape = (self.groups + META_PAD,)
        return {f"{self.name}.scale": (torch.float16, shape), f"{self.name}.zero": (torch.float16, shape)}

    def storage_specs(self) -> dict:
        return {**_code_specs(self.name, self.numel, self.bits), **self._meta_specs()}

    def compute_specs(self) -> dict:
        return {**_code_specs(self.name, self.numel, self.compute_bits), **self._meta_specs()}

    def meta(self, views: dict[str, torch.Tensor], what: str) -> torch.Tensor:
        """The `what` ("scale" or "zero") of each group, float16 [groups]."""
        return views[f"{self.name}.{what}"][: self.groups]

    def oriented(self, w: torch.Tensor) -> torch.Tensor:
        """The weight as the [out, in] matrix that is quantized (a transposed [in, out] weight is transposed)."""
        return w.t() if self.transposed else w

    def codes(self, views: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """The codes in natural order, flat [N * K]."""
        if bits == 3:
            q = unpack(views[f"{self.name}.q2"], self.numel, 2) | (unpack(views[f"{self.name}.q1"], self.numel, 1) << 2)
        else:
            q = unpack(views[f"{self.name}.q"], self.numel, bits)
        return from_kernel_order(q, self.in_features, self.group)

    def dequantize(self, views: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """The reference: (q - zero) * scale in float32, as the [out, in] matrix; any device."""
        q = self.codes(views, bits).view(self.groups, self.group).float()
        scale = self.meta(views, "scale").float().unsqueeze(1)
        zero = self.meta(views, "zero").float().unsqueeze(1)
        return ((q - zero) * scale).view(self.out_features, self.in_features)


def _quantize_flat(weights: torch.Tensor, bits: int, group: int, kernels: CpuKernels | None):
    """Flat float weights -> (codes uint8, scale, zero): the C optimiser, else hqq's `Quantizer` (same algorithm)."""
    if kernels is not None and weights.device.type == "cpu":
        return kernels.quantize(weights, bits, group)
    from hqq.core.quantize import Quantizer, hqq_base_quant_config

    params = dict(hqq_base_quant_config(nbits=bits, group_size=group, axis=1)["weight_quant_params"], bitpack=False)
    codes, meta = Quantizer.quantize(weights.float().reshape(-1, group), device=weights.device, **params)
    return codes.reshape(-1).to(torch.uint8).cpu(), meta["scale"].reshape(-1).cpu(), meta["zero"].reshape(-1).cpu()


def _pack_into(t: QuantizedTensor, codes: torch.Tensor, bits: int, kernels: CpuKernels | None,
               views: dict[str, torch.Tensor]) -> None:
    """Natural-order codes of `t` packed into its views, in kernel order where its shape is ordered."""
    packer = kernels.pack if kernels is not None else pack
    codes = kernels.order(codes, t.in_features, t.group) if kernels is not None else \
        to_kernel_order(codes, t.in_features, t.group)
    if bits == 3:
        views[f"{t.name}.q2"].copy_(packer(codes & 3, 2))
        views[f"{t.name}.q1"].copy_(packer(codes >> 2, 1))
    else:
        views[f"{t.name}.q"].copy_(packer(codes, bits))


class HQQExpertFormat:
    """One expert as HQQ-quantized, packed tensors in one buffer: `{name}.q` codes (3-bit: `.q2` and `.q1`),
    `{name}.scale` and `{name}.zero` (float16, one per group of `group_size` weights read flat), biases in the
    compute dtype. Weights are quantized in [out, in] orientation (a transposed [in, out] weight, GPT-OSS's, as
    its transpose). Scales and zeros in float16 cost 32 / group bits per weight (2-bit g16: 4.0 bits).

    `kernels` decides the compute form: with moeshard's CPU kernels, slots hold packed codes and `forward_grouped`
    multiplies from them; with tinygemm (CUDA), slots hold its int4 tiles; without, each call dequantizes.
    """

    meta_dtype = torch.float16
    quantized = True

    def __init__(self, tensors: tuple[ExpertTensor, ...], bits: int, group_size: int, compute_dtype: torch.dtype,
                 quant_device: torch.device | str | None = None, kernels: CpuKernels | None = None,
                 quantizer: str | None = None):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"expert bits must be one of {list(SUPPORTED_BITS)}, got {bits!r}")
        self.tensors = tuple(tensors)
        self.bits, self.group_size = bits, group_size
        self.dtype = compute_dtype  # what decode() returns and forward() gives back
        # Where encode() runs the optimiser when the C one is not used: None = where the weights are.
        self.quant_device = torch.device(quant_device) if quant_device is not None else None
        self._quantizer_kernels = cpu_kernels() if quantizer in (None, QUANTIZER_C) else None
        self.quantizer = QUANTIZER_C if self._quantizer_kernels is not None else QUANTIZER_HQQ
        self.weights = tuple(QuantizedTensor(t.name, t.shape, t.transposed, bits, group_size)
                             for t in self.tensors if not t.is_bias)
        self.biases = tuple(t for t in self.tensors if t.is_bias)
        bias_specs = {t.name: (compute_dtype, t.shape) for t in self.biases}
        self.layout = PackedLayout({k: v for w in self.weights for k, v in w.storage_specs().items()} | bias_specs)
        if isinstance(kernels, TinyGemm) and not all(
                kernels.supports(bits, w.out_features, w.in_features, group_size)
                and kernels.verified(w.out_features, w.in_features, group_size) for w in self.weights):
            kernels = None  # shapes tinygemm does not take: the reference path
        self.kernels = kernels
        if isinstance(kernels, TinyGemm):
            specs = {k: v for w in self.weights for k, v in
                     kernels.specs(w.name, w.out_features, w.in_features, group_size).items()}
            self.compute_layout = PackedLayout(specs | bias_specs)
        elif kernels is not None:
            self.compute_layout = PackedLayout({k: v for w in self.weights for k, v in w.compute_specs().items()}
                                               | bias_specs)
        else:
            self.compute_layout = self.layout
        self.compute_bits = self.weights[0].compute_bits if kernels is not None and self.weights else bits
        # Per-layer call constants: each weight by name, and where its codes, scales and zeros sit in a slot.
        self._by_name = {t.name: t for t in self.weights}
        where = {e.name: e.offset for e in self.compute_layout.entries}
        self._offsets = {t.name: (where.get(f"{t.name}.q"), where.get(f"{t.name}.scale"), where.get(f"{t.name}.zero"))
                         for t in self.weights}

    @property
    def num_params(self) -> int:
        return sum(w.numel for w in self.weights)

    @property
    def bits_per_param(self) -> float:
        """Bits per weight as stored and moved: codes, float16 scales and zeros, biases and alignment padding."""
        return self.layout.nbytes * 8 / self.num_params

    def describe(self) -> dict:
        """What the bytes mean, and the dtype computed in: backends that share it read the same weights."""
        return {"format": "hqq", "version": _FORMAT_VERSION, "bits": self.bits, "group_size": self.group_size,
                "axis": 1, "packing": "chunk16", "meta_dtype": "float16", "dtype": dtype_name(self.dtype)}

    @property
    def label(self) -> str:
        return f"hqq {self.bits}-bit g{self.group_size} ({dtype_name(self.dtype)})"

    @property
    def compute(self) -> str:
        """How slots are computed: "packed" (moeshard's CPU kernels), "tinygemm" (torch's int4 CUDA kernel) or
        "dequantize" (the reference, per call)."""
        return "dequantize" if self.kernels is None else getattr(self.kernels, "name", "packed")

    # -- storage form ------------------------------------------------------------------------
    def encode(self, weights: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Quantize one expert's dense weights and pack codes and meta-data into `out`."""
        return self.encode_many([weights], [out])[0]

    def encode_many(self, experts: list[dict[str, torch.Tensor]], outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Quantize several experts together (one optimiser call per tensor over all their groups, on every
        core) and pack each into its buffer in `outs`."""
        kernels = self._quantizer_kernels
        for t in self.tensors:
            for weights in experts:
                if tuple(weights[t.name].shape) != t.shape:
                    raise ValueError(f"expert tensor {t.name!r} has shape {list(weights[t.name].shape)}, "
                                     f"expected {list(t.shape)}")
        views = [self.layout.views(out) for out in outs]
        for v in views:  # scales and zeros carry padding: keep it zero whatever buffer we were given
            for t in self.weights:
                v[f"{t.name}.scale"].zero_()
                v[f"{t.name}.zero"].zero_()
        for t in self.biases:
            for v, weights in zip(views, experts):
                v[t.name].copy_(weights[t.name])
        for t in self.weights:
            stacked = torch.stack([t.oriented(w[t.name]) for w in experts])  # [n, N, K]
            if kernels is None and self.quant_device is not None:
                stacked = stacked.to(self.quant_device)
            codes, scale, zero = _quantize_flat(stacked, self.bits, self.group_size, kernels)
            codes, scale, zero = codes.view(len(experts), -1), scale.view(len(experts), -1), zero.view(len(experts), -1)
            for i, v in enumerate(views):
                _pack_into(t, codes[i], self.bits, kernels, v)
                t.meta(v, "scale").copy_(scale[i])
                t.meta(v, "zero").copy_(zero[i])
        return outs

    def decode(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense weights from a storage buffer, dequantized in float32 on `buf`'s device (the reference)."""
        views = self.layout.views(buf)
        weights = {t.name: views[t.name] for t in self.biases}
        for t in self.weights:
            w = t.dequantize(views, self.bits)
            weights[t.name] = w.t() if t.transposed else w
        return weights

    # -- compute form ------------------------------------------------------------------------
    def fill(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """A slot's compute form from a storage buffer (3-bit codes widened; everything else copied)."""
        if self.compute_layout is self.layout:
            dst.copy_(src)
            return
        s, d = self.layout.views(src), self.compute_layout.views(dst)
        if isinstance(self.kernels, TinyGemm):
            for t in self.weights:
                self.kernels.fill(t.name, t.codes(s, self.bits), t.meta(s, "scale"), t.meta(s, "zero"),
                                  t.out_features, t.in_features, self.group_size, d)
            for t in self.biases:
                d[t.name].copy_(s[t.name])
            return
        for t in self.weights:
            d[f"{t.name}.scale"].copy_(s[f"{t.name}.scale"])
            d[f"{t.name}.zero"].copy_(s[f"{t.name}.zero"])
            if self.bits == 3:
                self.kernels.widen3(s[f"{t.name}.q2"], s[f"{t.name}.q1"], t.numel, out=d[f"{t.name}.q"])
            else:
                d[f"{t.name}.q"].copy_(s[f"{t.name}.q"])
        for t in self.biases:
            d[t.name].copy_(s[t.name])

    def grouped(self, device: torch.device) -> bool:
        return isinstance(self.kernels, CpuKernels) and device.type == "cpu"

    def forward(self, math_: ExpertMath, buf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [t, D] through one expert whose slot holds `buf`."""
        if self.grouped(buf.device):
            return self.forward_grouped(math_, buf.view(1, -1), [0], [x.shape[0]], x)
        if isinstance(self.kernels, TinyGemm):
            views = self.compute_layout.views(buf)
            return math_.forward_with(lambda name, h: self.kernels.linear(name, views, h, self.group_size).float(),
                                      lambda name: views[name].float() if name in views else None,
                                      x.float()).to(self.dtype)
        views = self.layout.views(buf)  # the reference: dequantize, then multiply in float32
        w = {t.name: t.dequantize(views, self.bits) for t in self.weights}  # [out, in]
        return math_.forward_with(lambda name, h: F.linear(h, w[name]),
                                  lambda name: views[name].float() if name in views else None,
                                  x.float()).to(self.dtype)

    def forward_grouped(self, math_: ExpertMath, slab: torch.Tensor, index: list[int], counts: list[int],
                        x: torch.Tensor) -> torch.Tensor:
        """Rows `x` [S, D] grouped by expert, `counts[i]` of them for the expert in slot `index[i]` of `slab`
        [k, nbytes]: one kernel call per projection for all of them. Returns [S, D] in the compute dtype."""
        stride = slab.stride(0)
        stacked: dict[str, torch.Tensor] = {}  # strided views of the slots, made only when needed

        def views() -> dict[str, torch.Tensor]:
            if not stacked:
                stacked.update(self.compute_layout.stacked_views(slab))
            return stacked

        def linear(name: str, h: torch.Tensor) -> torch.Tensor:
            t = self._by_name[name]
            if self.kernels.fast(self.compute_bits, t.in_features, self.group_size):
                return self.kernels.qmm_grouped(self.compute_bits, t.out_features, t.in_features, self.group_size, h,
                                                slab, stride, self._offsets[name], index, counts)
            # shapes the kernel does not take (tiny models, groups across rows): dequantize each expert once
            return torch.cat([F.linear(part, t.dequantize({k: v[i] for k, v in views().items()}, self.compute_bits))
                              for i, part in zip(index, h.split(counts))])

        rows = torch.repeat_interleave(torch.tensor(index), torch.tensor(counts)) if self.biases else None  # [S]

        def bias(name: str) -> torch.Tensor | None:
            return views()[name][rows].float() if rows is not None and name in views() else None

        return math_.forward_with(linear, bias, x.float()).to(self.dtype)


# -- attention ----------------------------------------------------------------------------------------------
_ONE_SLOT = [0]


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is HQQ-quantized and packed: computed from the packed codes by moeshard's CPU
    kernels, or dequantized per call (CUDA, no compiler). Keeps the linear's dtype for its output and bias."""

    def __init__(self, linear: nn.Linear, bits: int, group: int, kernels: CpuKernels | None,
                 quantizer_kernels: CpuKernels | None):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, weight.dtype
        self.bits, self.group = bits, group
        self.spec = QuantizedTensor("weight", tuple(weight.shape), False, bits, group)
        on_cpu = weight.device.type == "cpu"
        if isinstance(kernels, CpuKernels) and not on_cpu:
            kernels = None
        if isinstance(kernels, TinyGemm) and (on_cpu or not (
                kernels.supports(bits, self.out_features, self.in_features, group)
                and kernels.verified(self.out_features, self.in_features, group))):
            kernels = None
        self.kernels = kernels
        codes, scale, zero = _quantize_flat(weight, bits, group, quantizer_kernels)
        self.compute_bits = self.spec.compute_bits  # 3-bit codes packed in 4-bit chunks: the same values
        # codes, scales and zeros in one buffer, laid out as a slot of an expert's tensor is
        self._layout = PackedLayout(self.spec.compute_specs())
        self.register_buffer("packed", torch.zeros(self._layout.nbytes, dtype=torch.uint8), persistent=False)
        views = self._layout.views(self.packed)
        views["weight.q"].copy_(pack(to_kernel_order(codes, self.in_features, group), self.compute_bits))
        self.spec.meta(views, "scale").copy_(scale)
        self.spec.meta(views, "zero").copy_(zero)
        self._offsets = tuple(e.offset for e in self._layout.entries)  # codes, scale, zero
        self._fast = isinstance(kernels, CpuKernels) and kernels.fast(self.compute_bits, self.in_features, group)
        self.compute = "tinygemm" if isinstance(kernels, TinyGemm) else "packed" if self._fast else "dequantize"
        if isinstance(kernels, TinyGemm):
            self._tile_layout = PackedLayout(kernels.specs("weight", self.out_features, self.in_features, group))
            self.register_buffer("tiles", self._tile_layout.empty(weight.device), persistent=False)
            kernels.fill("weight", codes.to(weight.device), scale.half().to(weight.device), zero.half().to(weight.device),
                         self.out_features, self.in_features, group, self._tile_layout.views(self.tiles))
        self.packed = self.packed.to(weight.device)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] in float32: what this module multiplies by."""
        return self.spec.dequantize(self._layout.views(self.packed), self.compute_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if isinstance(self.kernels, TinyGemm):
            y = self.kernels.linear("weight", self._tile_layout.views(self.tiles), x2, self.group).float()
        elif self._fast and x2.device.type == "cpu":
            y = self.kernels.qmm_grouped(self.compute_bits, self.out_features, self.in_features, self.group, x2,
                                         self.packed, 0, self._offsets, _ONE_SLOT, [x2.shape[0]])
        else:
            y = F.linear(x2.float(), self.dequantized())
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group={self.group}, compute={self.compute}")


def attention_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) for every nn.Linear directly under a `*.self_attn` module."""
    found = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "self_attn":
            found += [(module, child_name, child) for child_name, child in module.named_children()
                      if isinstance(child, nn.Linear)]
    return found


def quantize_attention(model: nn.Module, cfg: QuantConfig, device: torch.device | str) -> int:
    """Replace the attention projections of a materialised model by `PackedLinear`s on `device`.

    Embeddings, norms, routers and the LM head are left as they are. Returns how many modules were
    replaced (0 when `cfg.attn_bits` is 16).
    """
    if not cfg.attention_quantized:
        return 0
    device = torch.device(device)
    kernels = compute_kernels(cfg, device)
    quantizer = cpu_kernels()
    targets = attention_linears(model)
    for parent, attr, linear in targets:
        if linear.weight.is_meta:
            raise ValueError(f"attention weights of {type(parent).__name__}.{attr} are on the meta device: "
                             "load the dense weights before quantizing")
        check_groupable(attr, tuple(linear.weight.shape), cfg.attn_group)
        setattr(parent, attr, PackedLinear(linear.to(device), cfg.attn_bits, cfg.attn_group, kernels, quantizer))
    logger.info("quantized %d attention projections to %d-bit (group %d) on %s, computed %s", len(targets),
                cfg.attn_bits, cfg.attn_group, device, "from packed codes" if kernels is not None else
                "by dequantizing per call")
    return len(targets)


def compute_kernels(cfg: QuantConfig, device: torch.device) -> CpuKernels | TinyGemm | None:
    """The kernels that compute packed weights on `device` (unless the reference path is asked for): moeshard's
    on a CPU, torch's tinygemm int4 on a CUDA GPU of compute capability 8.0 or newer; none elsewhere."""
    if cfg.kernel == "reference":
        return None
    if device.type == "cpu":
        return cpu_kernels()
    return TinyGemm(device) if cuda_int4.available(device) else None

