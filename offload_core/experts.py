"""The expert side of a model, shared by the coordinator and the worker: device and dtype resolution, the
expert format (dense or HQQ), its source (checkpoint or quantized cache), and the `LocalExperts` backend.

It imports neither accelerate nor transformers' model classes, and hqq only when experts are quantized,
so that a worker starts quickly.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .backend import LocalExperts
from .checkpoint import Checkpoint
from .packing import DenseFormat
from .quant_config import QuantConfig
from .store import CheckpointSource

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str | None, config) -> torch.dtype:
    if name is not None:
        return DTYPES[name]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return DTYPES.get(str(dtype), torch.float32)


def build_local_experts(ckpt: Checkpoint, config, adapter, device: torch.device, slots_per_layer: int,
                        store: str, dtype: torch.dtype, quant: QuantConfig = QuantConfig(),
                        cache_dir: Path | None = None, progress: bool = False, policy: str = "lru") -> LocalExperts:
    """The expert side of a model: format, source, store and per-layer caches (shared with the worker).

    Dense experts are read from the checkpoint itself; quantized ones from the quantized cache, which is
    built on first use (on the GPU when there is one: quantizing is much faster there)."""
    shapes = adapter.expert_shape().tensors
    if quant.experts_quantized:
        from .qcache import QuantizedCacheSource, open_quantized_cache  # hqq is heavy: load it only when used
        from .quant import HQQExpertFormat

        fmt = HQQExpertFormat(shapes, quant.expert_bits, quant.expert_group_size, dtype,
                              quant_device=device if device.type == "cuda" else None)
        cache = open_quantized_cache(ckpt, adapter, fmt, expert_fingerprint(ckpt, adapter, fmt), root=cache_dir,
                                     progress=progress)
        source = QuantizedCacheSource(cache, drop_page_cache=ckpt.drop_page_cache)
    else:
        fmt = DenseFormat(shapes, dtype)
        source = CheckpointSource(ckpt, adapter, fmt)
    return LocalExperts(source, adapter, fmt, device, slots_per_layer, adapter.moe_layers(), store=store,
                        act_name=config.hidden_act, policy=policy, num_experts=adapter.num_experts)


def expert_fingerprint(ckpt: Checkpoint, adapter, fmt) -> str:
    """What a coordinator and a worker must agree on: the checkpoint (a sample of its bytes too) and the
    expert format."""
    return ckpt.fingerprint({"experts": fmt.describe()}, sample=adapter.fingerprint_sample(ckpt))


