"""Settings: quantization and offloading, each one frozen dataclass validated once, where it is built.

No torch or hqq import at module level: the CLIs build and check these before loading anything heavy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ALLOWED_BITS = (16, 8, 4, 3, 2)  # 16 = not quantized (kept in the compute dtype)
# The paper's expert groups: 2-bit needs small groups to stay usable; 3-bit and up use 64.
DEFAULT_EXPERT_GROUP = {2: 16, 3: 64, 4: 64, 8: 64}
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
STORES = {
    "ram": "experts wait in host RAM (pinned on CUDA), read from disk once",
    "disk": "experts are read from disk on every miss (machines with less RAM than the model)",
}
KERNELS = {
    "auto": "moeshard's CPU kernels multiply straight from the packed codes (built once with the system C "
            "compiler); on CUDA, or without a compiler, weights are dequantized on each call",
    "reference": "dequantize each weight on every call, then multiply in float32 (slow: for checking results)",
}
POLICIES = {
    "lru": "evict the least recently used expert (the paper's cache)",
    "router": "keep the experts that the router's own history says follow the ones just used (transition "
              "counts learnt online); an expert needed now but unlikely next streams through a slot instead of "
              "displacing a likely one",
    "none": "keep nothing between calls: every needed expert is loaded every time (the naive baseline)",
    "global-lru": "one cache for every layer's experts: evict the least recently used expert of any layer (layers "
                  "whose routing repeats itself hold fewer slots, the others more)",
    "global-lfru": "one cache for every layer's experts: evict the expert with the fewest recent uses (a use count "
                   "that halves every few hundred tokens), the least recently used among equals",
}
DEFAULT_POLICY = "router"  # chosen by measurement: README "Expert memory and cache policies"
GLOBAL_POLICIES = ("global-lru", "global-lfru")  # one budget of slots shared by all layers; the others: k per layer


@dataclass(frozen=True)
class QuantConfig:
    attn_bits: int = 16  # q/k/v/o projections; the paper uses 4
    attn_group: int = 64  # weights sharing one (scale, zero) pair in attention; the paper uses 64
    expert_bits: int = 16  # expert FFN weights; the paper uses 3 or 2
    expert_group: int | None = None  # None = the paper's group for expert_bits (2-bit: 16, 3/4/8-bit: 64)
    kernel: str = "auto"  # how packed weights are computed (see KERNELS); results agree to float32 rounding

    def __post_init__(self):
        for name, bits in (("attn_bits", self.attn_bits), ("expert_bits", self.expert_bits)):
            if bits not in ALLOWED_BITS:
                raise ValueError(f"{name} must be one of {list(ALLOWED_BITS)} (16 = not quantized), got {bits!r}")
        for name, group in (("attn_group", self.attn_group), ("expert_group", self.expert_group)):
            # hqq's config builder accepts only multiples of 8.
            if group is not None and (not isinstance(group, int) or group <= 0 or group % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 (e.g. 16, 64, 128), got {group!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {list(KERNELS)}, got {self.kernel!r}")

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


@dataclass(frozen=True)
class OffloadConfig:
    """How one model's experts are offloaded. Checked here once; `check_model` adds the model's own bounds."""

    device: str = "cpu"  # primary device: embeddings, attention, routers, LM head and the expert slots
    slots_per_layer: int = 2  # k experts resident on the device per layer; 1 <= k <= experts per layer
    # Devices whose memory holds expert slots, when several GPUs of one machine share them (the first is `device`);
    # () = `device` alone. Layers are placed on them by budget.
    expert_devices: tuple[str, ...] = ()
    # Bytes of device slots for packed experts (in their compute form), shared by all layers under a global policy,
    # split evenly under a per-layer one; "auto" = sized from the device's free memory; None = slots_per_layer decides.
    expert_memory: int | str | None = None
    prefetch: int = 1  # m experts per token of the next layer loaded speculatively; 0 turns prefetch off
    store: str | None = None  # host tier (see STORES); None = ram on CUDA, disk on CPU
    dtype: str | None = None  # compute dtype (see DTYPE_NAMES); None = the checkpoint's own (config.json "dtype")
    policy: str = DEFAULT_POLICY  # slot eviction policy (see POLICIES)
    quant: QuantConfig = field(default_factory=QuantConfig)  # HQQ bits for attention and experts; 16/16 = none
    cache_dir: Path | None = None  # quantized caches live under it; None = $MOESHARD_CACHE_DIR or ~/.cache/moeshard
    drop_page_cache: bool = False  # disk tier: tell the kernel to forget what it read (cold-read benchmarks)
    # Cache-aware routing: this bonus is added to the router logits of experts resident in a slot before top-k (their
    # weights stay the router's own); 0 = off, routing exactly as the model's.
    cache_aware_routing: float = 0.0

    def __post_init__(self):
        if not isinstance(self.slots_per_layer, int) or self.slots_per_layer < 1:
            raise ValueError(f"slots_per_layer must be >= 1 (experts resident per layer), got {self.slots_per_layer!r}")
        if not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (0 = off), got {self.prefetch!r}")
        if self.store is not None and self.store not in STORES:
            raise ValueError(f"store must be one of {sorted(STORES)}, got {self.store!r}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(set(DTYPE_NAMES.values()))}, got {self.dtype!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        memories = self.expert_memory if isinstance(self.expert_memory, tuple) else (self.expert_memory,)
        for memory in memories:
            if memory is not None and memory != "auto" and (
                    isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
                raise SettingError("expert_memory", f"expert memory must be a size in bytes > 0 or 'auto', got "
                                                    f"{memory!r}")
        devices = tuple(str(d) for d in self.expert_devices)
        object.__setattr__(self, "expert_devices", devices)
        for d in devices:
            check_device_name(d)
        if len(devices) > 1 and not all(d.startswith("cuda") for d in devices):
            raise SettingError("device", f"several devices ({', '.join(devices)}) spread expert slots over the GPUs of "
                                         "one machine: each must be cuda:N. A CPU has one memory: use cpu alone (its "
                                         "slots are RAM), and other machines through moe-worker")
        if len(set(devices)) < len(devices):
            raise SettingError("device", f"a device is named twice in {', '.join(devices)}")
        if devices and devices[0] != str(self.device):
            raise SettingError("device", f"the first expert device ({devices[0]}) must be the primary device "
                                         f"({self.device})")
        if isinstance(self.expert_memory, tuple) and len(self.expert_memory) != max(1, len(devices)):
            raise SettingError("expert_memory", f"{len(self.expert_memory)} expert memory sizes for "
                                                f"{max(1, len(devices))} device(s): give one for each, or one for all")
        if isinstance(self.cache_aware_routing, bool) or not isinstance(self.cache_aware_routing, (int, float)) or \
                not 0.0 <= float(self.cache_aware_routing) < float("inf"):
            raise SettingError("cache_aware_routing", f"the cache-aware routing bonus must be a finite number >= 0 "
                                                      f"(0 = off), got {self.cache_aware_routing!r}")
        if not isinstance(self.quant, QuantConfig):
            raise ValueError(f"quant must be a QuantConfig, got {type(self.quant).__name__}")
        check_device_name(self.device)
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())

    def check_model(self, num_experts: int) -> None:
        """The bounds that depend on the model: k and m at most the experts per layer."""
        if self.expert_memory is None and self.slots_per_layer > num_experts:
            raise ValueError(f"slots_per_layer must be <= {num_experts} (experts per layer in this model), "
                             f"got {self.slots_per_layer}")
        if self.prefetch > num_experts:
            raise ValueError(f"prefetch must be <= {num_experts} (experts per layer), got {self.prefetch}")

    def memory_for(self, index: int) -> int | str | None:
        """The expert memory of the `index`-th expert device (one size may serve them all)."""
        if isinstance(self.expert_memory, tuple):
            return self.expert_memory[index]
        return self.expert_memory

    def store_for(self, device_type: str) -> str:
        return self.store or ("ram" if device_type == "cuda" else "disk")


class SettingError(ValueError):
    """A setting whose value cannot work; the message speaks of the value, `setting` names it (a program maps it to
    its own flag: `--device` for `device`)."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def check_device_name(device: str) -> None:
    """'cpu', 'cuda' or 'cuda:N' (also 'mps'); anything else is a clear error, without importing torch."""
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()) or (index and kind == "cpu"):
        raise SettingError("device", f"device {device!r} is not one moeshard runs on: expected cpu, cuda or cuda:N")


def resolve_device(device: str):
    """The torch device for a checked name; 'cuda' becomes the current CUDA device."""
    import torch

    check_device_name(device)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", f"device {str(device)!r} requested but CUDA is not available here: use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SettingError("device", f"device {str(device)!r} requested but this machine has "
                                     f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str | None, config=None):
    """The compute dtype: `name` when given, else the checkpoint's (config.json "dtype"), else float32."""
    import torch

    if name is not None:
        return getattr(torch, DTYPE_NAMES[name])
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, DTYPE_NAMES.get(str(dtype), "float32"))


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'12GiB', '500MB', '1.5g', '1048576' -> bytes (> 0)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as 12GiB, 500MB or 1048576, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"expected a size > 0, got {text!r}")
    return value


def human_bytes(n: float) -> str:
    """A size with the unit that keeps it readable: 11.6 MiB, not 0.01 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
