"""`load_model`: transformers' own model for the family, with its experts offloaded, as an `OffloadedModel`.

The model is built on the meta device; everything that is not an expert (embeddings, attention, norms,
routers, shared experts, dense MLP layers, LM head) is read from the checkpoint and materialised on the
primary device; the fused expert parameters stay on meta, and each sparse layer's experts module is served
by a `MoELayer` through the "moeshard" experts implementation. Nothing in transformers is patched or
subclassed.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel

from .cache_aware import check_supported as check_cache_aware_family
from .cache_aware import install as install_cache_aware_routing
from .checkpoint import Checkpoint, CheckpointError
from .config import OffloadConfig, QuantConfig, resolve_device, resolve_dtype
from .counters import RuntimeStats
from .families import FamilyLayout, build_meta_model, check_quantization, load_config
from .local_experts import expert_fingerprint, open_local_experts
from .moe_layer import IMPLEMENTATION, MoELayer, next_layer_predictor, register_experts_implementation
from .runtime import ExpertRuntime
from .stores import ExpertSource

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class OffloadedModel:
    """transformers' model with its experts served by moeshard.

    `model` is transformers' own model (`om.model.generate(...)`, `om.model(ids).logits`); `generate` and
    `__call__` are forwarded for convenience. `runtime` is the expert plane (local slots, joined workers),
    `layout` the family's structure, `fingerprint` what a worker must agree on.
    """

    model: PreTrainedModel
    runtime: ExpertRuntime
    layout: FamilyLayout
    checkpoint: Checkpoint
    fingerprint: str
    config: OffloadConfig

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def stats(self) -> RuntimeStats:
        """Cache, prefetch and backend counters, per MoE layer and in total."""
        return self.runtime.stats()

    def format_stats(self) -> str:
        return self.stats().table()

    @property
    def expert_format(self):
        """How this model's experts are packed (and computed)."""
        return self.runtime.local.format

    @property
    def slot_bytes(self) -> int:
        """Bytes of one expert slot on the device, in the form experts are computed in."""
        return self.runtime.local.slot_bytes

    def expert_source(self) -> ExpertSource:
        """Where this model's packed experts are read from (what a worker without them is sent)."""
        return self.runtime.local.store.source

    def size_bytes(self) -> int:
        """Bytes of the model as moeshard stores it: the materialised dense weights (HQQ-packed attention
        included) plus every expert's packed buffer."""
        dense = sum(t.numel() * t.element_size() for t in self.model.state_dict().values()
                    if isinstance(t, torch.Tensor) and not t.is_meta)
        local = self.runtime.local
        return dense + local.format.layout.nbytes * len(local.slots) * self.layout.num_experts

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> OffloadedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def planned_format(path: str | Path, config: OffloadConfig):
    """The expert format `load_model(path, config)` will use, from config.json alone: no weight is read and
    nothing is quantized, so settings (and slot sizes) can be checked before a long load."""
    from .formats import expert_format

    hf_config = load_config(Checkpoint(path))
    dtype = resolve_dtype(config.dtype, hf_config)
    register_experts_implementation()
    layout = FamilyLayout(build_meta_model(hf_config, dtype=dtype, experts_implementation=IMPLEMENTATION), None,
                          check_quantization(hf_config))
    return expert_format(layout.tensors, config.quant, dtype, device=resolve_device(config.device))


def planned_expert_format(path: str | Path, config: OffloadConfig) -> str:
    """The label of the expert format `load_model(path, config)` will use ("dense float32", "hqq 3-bit g64
    (bfloat16)"): what workers are checked against before a long load."""
    return planned_format(path, config).label


def load_model(path: str | Path, config: OffloadConfig | None = None, *, progress: bool = False,
               **overrides) -> OffloadedModel:
    """Open a Hugging Face MoE checkpoint folder; return transformers' model with its experts offloaded.

    Settings come as one `OffloadConfig`; keyword `overrides` replace its fields (`load_model(p, slots_per_layer=4)`).
    With quantization, attention is quantized with HQQ on load and experts come from a quantized cache built
    once on disk.
    """
    if "quant" in overrides and overrides["quant"] is None:
        overrides["quant"] = QuantConfig()
    if "device" in overrides:
        overrides["device"] = str(overrides["device"])
    cfg = dataclasses.replace(config or OffloadConfig(), **overrides)
    device = resolve_device(cfg.device)
    ckpt = Checkpoint(path, drop_page_cache=cfg.drop_page_cache)
    hf_config = load_config(ckpt)
    quantization = check_quantization(hf_config)
    compute_dtype = resolve_dtype(cfg.dtype, hf_config)

    register_experts_implementation()
    model = build_meta_model(hf_config, dtype=compute_dtype, experts_implementation=IMPLEMENTATION)
    layout = FamilyLayout(model, ckpt, quantization)
    cfg.check_model(layout.num_experts)
    if cfg.cache_aware_routing > 0:  # refuse a family it cannot serve before the long part of the load
        check_cache_aware_family(layout.model_type, layout.router(model, layout.sparse_layers[0]))
    layout.validate(ckpt)
    _load_dense_weights(model, ckpt, layout, device, compute_dtype, progress)
    if cfg.quant.attention_quantized:
        from .quant import quantize_attention  # hqq is heavy: load it only when used

        quantize_attention(model, cfg.quant, device)
    model.eval()
    if (ckpt.path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(ckpt.path)

    local = open_local_experts(ckpt, layout, cfg, device, compute_dtype, progress=progress)
    if cfg.expert_memory is not None:  # a byte budget: the per-layer k it amounts to (a global cache's fair share)
        cfg = dataclasses.replace(cfg, slots_per_layer=local.slots_per_layer)
        for line in local.memory_lines():
            logger.info("%s", line)
    runtime = ExpertRuntime(local)
    _attach_moe_layers(model, layout, runtime, cfg.prefetch)
    # Cache-aware routing (opt-in): hooks on the routers that add the bonus to resident experts before top-k; with
    # a bonus of 0 nothing is installed. The predictors above call the same router modules, so predictions see
    # the bonus too (they guess what the biased router will choose; see cache_aware.py).
    try:
        install_cache_aware_routing(model, layout, runtime, cfg.cache_aware_routing, compute_dtype)
    except Exception:
        runtime.close()
        raise
    om = OffloadedModel(model, runtime, layout, ckpt, expert_fingerprint(ckpt, layout, local.format), cfg)
    logger.info("loaded %s (%s): %d MoE layers x %d experts (top-%d), k=%d slots/layer, prefetch=%d, store=%s, "
                "device=%s", ckpt.path, layout.model_type, len(layout.sparse_layers), layout.num_experts,
                layout.top_k, cfg.slots_per_layer, cfg.prefetch, local.store.kind, device)
    return om


def _attach_moe_layers(model: PreTrainedModel, layout: FamilyLayout, runtime: ExpertRuntime, prefetch: int) -> None:
    """Serve every sparse layer through `runtime`, predicting the next sparse layer's experts when prefetch > 0."""
    layers = layout.sparse_layers
    for i, layer in enumerate(layers):
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        predictor = None
        if nxt is not None and prefetch > 0:
            predictor = next_layer_predictor(layout.pre_moe_norm(model, nxt), layout.router(model, nxt))
        moe = MoELayer(layer, layout.num_experts, runtime, prefetch, nxt, predictor)
        moe.attach(layout.experts_module(model, layer), layout.pre_moe_norm(model, layer))


def _load_dense_weights(model: PreTrainedModel, ckpt: Checkpoint, layout: FamilyLayout, device: torch.device,
                        dtype: torch.dtype, progress: bool) -> None:
    """Materialise every non-expert parameter from the checkpoint on `device`; experts stay on meta.

    Floating tensors take the model's own dtype for them: the compute dtype, except where the family keeps a
    module in float32 (transformers' `_keep_in_fp32_modules`, e.g. GPT-OSS's norms, DeepSeek-V3's router)."""
    expected = model.state_dict()
    fp32 = _keep_in_fp32(model, dtype)
    state = {}
    for name in tqdm(sorted(layout.dense), desc="loading dense weights", disable=not progress, unit="tensor"):
        target = layout.dense[name]
        if target not in expected:
            continue  # reported as unexpected below
        tensor = ckpt.get(name)
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if fp32(target) else dtype)
        state[target] = tensor.to(device)
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = sorted(n for n, target in layout.dense.items()
                        if target not in expected and not any(p.search(target) for p in ignored))
    if unexpected:
        raise CheckpointError(f"checkpoint has tensors that a {model.config.model_type} model with this config.json "
                              f"does not: {unexpected[:5]}")
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    allowed = layout.expert_param_names()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        allowed |= {n for n in missing if n.startswith("lm_head.")}
    absent = sorted(set(missing) - allowed)
    if absent:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} is missing tensor {absent[0]!r}"
                              + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


def _keep_in_fp32(model: PreTrainedModel, dtype: torch.dtype):
    """name -> whether transformers would keep that tensor in float32 at this compute dtype."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return lambda name: False
    from transformers.core_model_loading import build_glob_alternation

    alternation, _, _ = build_glob_alternation(list(plan))
    return lambda name: alternation.search(name) is not None
