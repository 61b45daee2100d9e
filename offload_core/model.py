"""`load_model`: transformers' own model for the family, with its experts offloaded.

The model is built on the meta device; everything that is not an expert (embeddings, attention, norms,
routers, LM head) is read from the checkpoint and materialised on the primary device; the fused expert
parameters stay on meta, and each layer's experts module is served by a `MoELayer` through the
"moeshard" experts implementation. Nothing in transformers is patched or subclassed.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from .checkpoint import Checkpoint, CheckpointError
from .experts import DTYPES, build_local_experts, expert_fingerprint, resolve_device, resolve_dtype
from .families import adapter_for
from .moe_layer import IMPLEMENTATION, MoELayer, register_experts_implementation
from .quant_config import QuantConfig
from .runtime import ExpertRuntime

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class OffloadConfig:
    device: str = "cpu"  # primary device: embeddings, attention, routers, LM head and the expert slots
    slots_per_layer: int = 2  # k experts resident on the device per layer; 1 <= k <= experts per layer
    prefetch: int = 1  # m experts of the next layer loaded speculatively per step; 0 turns prefetch off
    store: str | None = None  # host tier: "ram" (pinned when CUDA) or "disk"; None = ram on CUDA, disk on CPU
    dtype: str | None = None  # compute dtype; None = the checkpoint's own (config.json "dtype")
    quant: QuantConfig = QuantConfig()  # HQQ bits for attention and experts; 16/16 = none
    cache_dir: Path | None = None  # quantized caches live under it; None = $MOESHARD_CACHE_DIR or ~/.cache/moeshard
    drop_page_cache: bool = False  # disk tier: tell the kernel to forget what it read (cold-read benchmarks)
    policy: str = "lru"  # slot eviction policy (see cache.POLICIES)

    def __post_init__(self):
        if self.slots_per_layer < 1:
            raise ValueError(f"slots_per_layer must be >= 1 (experts resident per layer), got {self.slots_per_layer}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (0 = off), got {self.prefetch}")
        if self.store not in (None, "ram", "disk"):
            raise ValueError(f"store must be 'ram' or 'disk', got {self.store!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def load_model(path: str | Path, *, device: str | torch.device = "cpu", slots_per_layer: int = 2, prefetch: int = 1,
               store: str | None = None, dtype: str | None = None, quant: QuantConfig | None = None,
               cache_dir: str | Path | None = None, drop_page_cache: bool = False, policy: str = "lru",
               progress: bool = False) -> PreTrainedModel:
    """Open a Hugging Face MoE checkpoint folder and return transformers' model with offloaded experts.

    The result supports `model(input_ids).logits` and `model.generate(...)`; `model.expert_stats()`
    returns cache and prefetch counters and `model.moeshard` is the `ExpertRuntime`. With `quant`,
    attention is quantized with HQQ on load and experts come from a quantized cache built once on disk.
    """
    opts = OffloadConfig(str(device), slots_per_layer, prefetch, store, dtype, quant or QuantConfig(),
                         Path(cache_dir) if cache_dir is not None else None, drop_page_cache, policy)
    device = resolve_device(opts.device)
    ckpt = Checkpoint(path, drop_page_cache=opts.drop_page_cache)
    config = AutoConfig.from_pretrained(ckpt.path)
    adapter = adapter_for(config)
    if opts.slots_per_layer > adapter.num_experts:
        raise ValueError(
            f"slots_per_layer must be <= {adapter.num_experts} (experts per layer in this model), got {opts.slots_per_layer}"
        )
    if opts.prefetch > adapter.num_experts:
        raise ValueError(f"prefetch must be <= {adapter.num_experts} (experts per layer), got {opts.prefetch}")
    adapter.validate(ckpt)
    compute_dtype = resolve_dtype(opts.dtype, config)
    store_kind = opts.store or ("ram" if device.type == "cuda" else "disk")

    register_experts_implementation()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, experts_implementation=IMPLEMENTATION)
    _load_dense_weights(model, ckpt, adapter, device, compute_dtype, progress)
    if opts.quant.attention_quantized:
        from .quant import quantize_attention  # hqq is heavy: load it only when used

        quantize_attention(model, opts.quant, device)
    model.eval()
    if (ckpt.path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(ckpt.path)

    local = build_local_experts(ckpt, config, adapter, device, opts.slots_per_layer, store_kind, compute_dtype,
                                opts.quant, opts.cache_dir, progress, opts.policy)
    runtime = ExpertRuntime({"local": local})
    attach_moe_layers(model, adapter, runtime, opts.prefetch, opts.slots_per_layer)
    model.moeshard = runtime
    model.expert_stats = runtime.stats
    model.moeshard_checkpoint = ckpt
    model.moeshard_fingerprint = expert_fingerprint(ckpt, adapter, local.format)
    logger.info("loaded %s: %d MoE layers x %d experts, k=%d slots/layer, prefetch=%d, store=%s, device=%s",
                ckpt.path, len(adapter.moe_layers()), adapter.num_experts, opts.slots_per_layer, opts.prefetch,
                store_kind, device)
    return model


def attach_moe_layers(model: PreTrainedModel, adapter, runtime: ExpertRuntime, prefetch: int, prefetch_cap: int) -> None:
    """Serve every MoE layer of `model` through `runtime`, with next-layer prediction when prefetch > 0."""
    layers = adapter.moe_layers()
    for i, layer in enumerate(layers):
        next_layer = layers[i + 1] if i + 1 < len(layers) else None
        predictor = functools.partial(adapter.router_logits, model, next_layer) if next_layer is not None else None
        moe = MoELayer(layer, adapter.num_experts, runtime, predictor, prefetch, prefetch_cap)
        moe.next_layer = next_layer
        moe.attach(adapter.experts_module(model, layer), adapter.pre_moe_norm(model, layer))


def _load_dense_weights(model: PreTrainedModel, ckpt: Checkpoint, adapter, device: torch.device,
                        dtype: torch.dtype, progress: bool) -> None:
    """Materialise every non-expert parameter from the checkpoint on `device`; experts stay on meta."""
    state = {}
    names = [n for n in ckpt.names if not adapter.is_expert_tensor(n)]
    for name in tqdm(names, desc="loading dense weights", disable=not progress, unit="tensor"):
        tensor = ckpt.get(name)
        state[adapter.model_name(name)] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(
            f"checkpoint has tensors that a {model.config.model_type} model with this config.json does not: "
            f"{sorted(unexpected)[:5]}"
        )
    expected_missing = {n for layer in adapter.moe_layers() for n in adapter.expert_param_names(layer)}
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        expected_missing |= {n for n in missing if n.startswith("lm_head.")}
    absent = sorted(set(missing) - expected_missing)
    if absent:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} is missing tensor {absent[0]!r}"
                              + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


def model_size_bytes(model: PreTrainedModel) -> int:
    """Bytes of the model as moeshard stores it: the materialised dense weights (HQQ-packed attention
    included) plus every expert's packed buffer."""
    dense = sum(t.numel() * t.element_size() for t in model.state_dict().values()
                if isinstance(t, torch.Tensor) and not t.is_meta)
    local = model.moeshard.backends[model.moeshard.local]
    return dense + local.format.layout.nbytes * len(local.caches) * model.config.num_local_experts
