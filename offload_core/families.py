"""Family layouts: where a checkpoint keeps layer L's expert e, which layers are sparse, and where the
routers and norms of transformers' model live. A family is data, found rather than written.

`FamilyLayout` is built from transformers' own model for the config (on the meta device) and the
checkpoint's tensor names:
- sparse layers are the decoder layers whose MLP has a decorated experts module (`use_experts_implementation`),
  so dense layers in between (Qwen3's `mlp_only_layers`, DeepSeek's `first_k_dense_replace`) and shared
  experts are ordinary dense weights;
- each checkpoint name goes through transformers' own conversion mapping for the family
  (`conversion_mapping.py`): a name that lands on an experts parameter is an expert tensor (a row of a fused
  [E, ...] tensor, or one part of a per-expert tensor that transformers would stack and concatenate), any
  other name is a dense weight with its model name;
- GPT-OSS checkpoints ship experts as MXFP4 blocks and scales: read per expert and dequantized with
  transformers' own `convert_moe_packed_tensors`.
Other pre-quantized formats (FP8, GPTQ, AWQ, ...) are refused with a message naming the format.
"""
from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import Checkpoint, CheckpointError
from .experts import ExpertMath, ExpertTensor

logger = logging.getLogger(__name__)

# E = experts per layer, R = rows of a weight, G = MXFP4 groups of 32 values per row

# Families whose tiny checkpoints moeshard's tests compare against transformers (logits and greedy tokens).
VERIFIED_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe")
_ROUTER_NAMES = ("gate", "router")
_NORM_NAMES = ("post_attention_layernorm", "pre_feedforward_layernorm", "ffn_norm")
_SHARED_NAMES = ("shared_expert", "shared_experts")
READABLE_QUANTIZATION = ("mxfp4",)


@dataclass(frozen=True)
class Fused:
    """A checkpoint tensor [E, *shape]: expert e is its row e."""

    name: str

    def names(self, num_experts: int) -> list[str]:
        return [self.name]


@dataclass(frozen=True)
class PerExpert:
    """One checkpoint tensor per expert and part: `parts[p][e]`; an expert's parts concatenate along dim 0
    (Mixtral's w1 and w3 make gate_up, as transformers' MergeModulelist + Concatenate do)."""

    parts: tuple[tuple[str, ...], ...]

    def names(self, num_experts: int) -> list[str]:
        return [part[e] for e in range(num_experts) for part in self.parts]

    def of(self, expert: int) -> list[str]:
        return [part[expert] for part in self.parts]


@dataclass(frozen=True)
class Mxfp4:
    """GPT-OSS MXFP4: blocks [E, R, G, 16] (two 4-bit values a byte) and scales [E, R, G] (power-of-two
    exponents), dequantized per expert with transformers' own function (which also transposes to [in, out])."""

    blocks: str
    scales: str

    def names(self, num_experts: int) -> list[str]:
        return [self.blocks, self.scales]


Source = Fused | PerExpert | Mxfp4


def build_meta_model(config, dtype: torch.dtype | None = None, experts_implementation: str | None = None):
    """transformers' model for `config` with parameters on the meta device (buffers real: they are small)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.copy(config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # weights are dequantized by moeshard, never by a transformers quantizer
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with init_empty_weights(include_buffers=False):
        try:
            return AutoModelForCausalLM.from_config(config, **kwargs)
        except ValueError as exc:
            raise CheckpointError(f"transformers cannot build a causal LM for model_type "
                                  f"{getattr(config, 'model_type', None)!r}: {exc}") from exc


def load_config(ckpt: Checkpoint):
    """transformers' config for a checkpoint folder; a clear error when transformers does not know it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ckpt.path)
    except (ValueError, KeyError) as exc:
        model_type = ckpt.config_dict.get("model_type")
        raise CheckpointError(f"config.json has model_type {model_type!r}, which this transformers does not know "
                              "(expected a Mixture-of-Experts family such as mixtral, qwen3_moe, gpt_oss or "
                              "deepseek_v3)") from exc


def check_quantization(config) -> str | None:
    """The pre-quantization method moeshard reads (mxfp4), None for unquantized, a clear error otherwise."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) or "unknown"
    method = str(getattr(method, "value", method))
    if method not in READABLE_QUANTIZATION:
        raise CheckpointError(
            f"this checkpoint is pre-quantized with {method!r}, a format moeshard does not read: use the "
            "unquantized (bfloat16/float16/float32) checkpoint and let moeshard quantize its experts and attention "
            f"(pre-quantized formats read: {', '.join(READABLE_QUANTIZATION)})")
    return method


class FamilyLayout:
    """One model's MoE structure and the checkpoint names behind every expert and dense weight."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint | None, quantization: str | None = None):
        """`ckpt` None: the structure only (a worker computing experts it received), no checkpoint names."""
        self.config = model.config
        self.model_type: str = model.config.model_type
        self.quantization = quantization
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise CheckpointError(self._unsupported())
        prefix = _path_of(model, decoder) + ".layers"
        self.experts_paths: dict[int, str] = {}
        self.router_paths: dict[int, str] = {}
        self.norm_paths: dict[int, str] = {}
        self.shared_experts: dict[int, str] = {}
        first = None
        for index, layer in enumerate(layers):
            found = _find_experts(layer)
            if found is None:
                continue
            block_name, experts = found
            block = layer.get_submodule(block_name) if block_name else layer
            base = f"{prefix}.{index}"
            self.experts_paths[index] = _join(base, block_name, "experts")
            router = next((n for n in _ROUTER_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
            if router is None:
                raise CheckpointError(f"layer {index} of {self.model_type}: no router ('gate' or 'router') beside "
                                      "its experts")
            self.router_paths[index] = _join(base, block_name, router)
            norm = next((n for n in _NORM_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
            if norm is not None:
                self.norm_paths[index] = f"{base}.{norm}"
            shared = next((n for n in _SHARED_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
            if shared is not None:
                self.shared_experts[index] = _join(base, block_name, shared)
            first = first or experts
        if first is None:
            raise CheckpointError(self._unsupported())
        self.sparse_layers: list[int] = sorted(self.experts_paths)
        try:
            self.math = ExpertMath(first)
            self.tensors: tuple[ExpertTensor, ...] = self.math.tensors(first)
        except ValueError as exc:
            raise CheckpointError(f"model_type {self.model_type!r}: {exc}") from exc
        self.num_experts: int = int(next(first.parameters()).shape[0])
        router = model.get_submodule(self.router_paths[self.sparse_layers[0]])
        self.top_k: int = int(getattr(router, "top_k", 0) or getattr(self.config, "num_experts_per_tok", 0))
        self.hidden_size: int = int(self.config.hidden_size)
        self.experts_class = type(first).__name__
        if self.model_type not in VERIFIED_FAMILIES:
            logger.warning("model_type %r has not been verified against transformers by moeshard's tests; its experts "
                           "follow transformers' experts interface, so outputs should match", self.model_type)
        self.dense: dict[str, str] = {}  # checkpoint name -> model parameter/buffer name
        self.sources: dict[tuple[int, str], Source] = {}  # (layer, tensor name) -> where its experts are
        if ckpt is not None:
            self._scan(model, ckpt)

    def _unsupported(self) -> str:
        return (f"model_type {self.model_type!r} is not a Mixture-of-Experts family moeshard can run: none of its "
                "layers has an experts module with transformers' experts interface (expected e.g. mixtral, "
                "qwen3_moe, qwen2_moe, olmoe, deepseek_v2/v3, gpt_oss, phimoe)")

    # -- the checkpoint's names ---------------------------------------------------------------
    def _scan(self, model: nn.Module, ckpt: Checkpoint) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_renamings, \
            rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta_state = dict.fromkeys(model.state_dict())
        params = {f"{path}.{t.param}": (layer, t) for layer, path in self.experts_paths.items() for t in self.tensors}
        parts: dict[tuple[int, str], dict[int, dict[int, str]]] = {}  # (layer, tensor) -> part -> expert -> name
        for name in ckpt.names:
            target, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, meta_state)
            if target not in params and self.quantization == "mxfp4":
                stem, _, kind = target.rpartition("_")
                if kind in ("blocks", "scales") and stem in params:
                    layer, t = params[stem]
                    held = self.sources.get((layer, t.name))
                    blocks, scales = (held.blocks, held.scales) if isinstance(held, Mxfp4) else ("", "")
                    self.sources[(layer, t.name)] = Mxfp4(name if kind == "blocks" else blocks,
                                                          name if kind == "scales" else scales)
                    continue
            if target not in params:
                self.dense[name] = target
                continue
            layer, t = params[target]
            if pattern is None:
                self.sources[(layer, t.name)] = Fused(name)
                continue
            converter = next(c for c in converters if pattern in c.source_patterns)
            _check_stacking(converter, name)
            expert = _expert_index(pattern, apply_renamings(name, renamings), name)
            parts.setdefault((layer, t.name), {}).setdefault(converter.source_patterns.index(pattern), {})[expert] = name
        for key, by_part in parts.items():
            per_part = []
            for part in sorted(by_part):
                names = by_part[part]
                missing = sorted(set(range(self.num_experts)) - set(names))
                if missing:
                    j, sample = next(iter(names.items()))
                    name = re.sub(rf"(experts\.){j}(\.)", rf"\g<1>{missing[0]}\2", sample, count=1)
                    raise CheckpointError(f"checkpoint {str(ckpt.path)!r} is missing tensor {name!r} (expert "
                                          f"{missing[0]} of layer {key[0]}; config.json says {self.num_experts} "
                                          "experts per layer)")
                if max(names) >= self.num_experts:
                    raise CheckpointError(f"checkpoint {str(ckpt.path)!r} has expert {max(names)} in layer {key[0]}, "
                                          f"but config.json says {self.num_experts} experts per layer")
                per_part.append(tuple(names[e] for e in range(self.num_experts)))
            self.sources[key] = PerExpert(tuple(per_part))

    def validate(self, ckpt: Checkpoint) -> None:
        """Every expert tensor of every sparse layer present with the shape the config implies."""
        E = self.num_experts
        for layer in self.sparse_layers:
            for t in self.tensors:
                src = self.sources.get((layer, t.name))
                where = f"layer {layer}, expert tensor {t.param!r}"
                if src is None:
                    raise CheckpointError(f"checkpoint {str(ckpt.path)!r} has no tensor for {where} "
                                          f"(expected by the {self.model_type} model built from config.json)")
                if isinstance(src, Fused):
                    _expect_shape(ckpt, src.name, (E, *t.shape))
                elif isinstance(src, PerExpert):
                    shapes = [tuple(ckpt.shape(n)) for n in src.of(0)]
                    joined = (sum(s[0] for s in shapes), *shapes[0][1:]) if shapes else ()
                    if joined != t.shape or any(s[1:] != shapes[0][1:] for s in shapes):
                        raise CheckpointError(f"{where}: per-expert tensors {src.of(0)} have shapes "
                                              f"{[list(s) for s in shapes]}, expected {list(t.shape)} together "
                                              "(from config.json)")
                    for e in range(1, E):
                        for n, shape in zip(src.of(e), shapes):
                            _expect_shape(ckpt, n, shape)
                else:
                    if not src.blocks or not src.scales:
                        raise CheckpointError(f"{where}: MXFP4 needs both _blocks and _scales tensors")
                    blocks, scales = ckpt.shape(src.blocks), ckpt.shape(src.scales)
                    if len(blocks) != 4 or blocks[0] != E or blocks[:3] != scales or (blocks[2] * blocks[3] * 2,
                                                                                      blocks[1]) != t.shape:
                        raise CheckpointError(f"{where}: MXFP4 blocks {list(blocks)} and scales {list(scales)} do not "
                                              f"make the expected [{E}, {', '.join(map(str, t.shape))}] weight")

    # -- reading experts ----------------------------------------------------------------------
    def expert_names(self) -> set[str]:
        """Every checkpoint tensor that holds experts (never loaded as dense weights)."""
        return {n for src in self.sources.values() for n in src.names(self.num_experts)}

    def read_expert(self, ckpt: Checkpoint, layer: int, expert: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """One expert's tensors (moeshard names), read from the checkpoint: only that expert's bytes."""
        out = {}
        for t in self.tensors:
            src = self.sources[(layer, t.name)]
            if isinstance(src, Fused):
                out[t.name] = ckpt.get_rows(src.name, expert)
            elif isinstance(src, PerExpert):
                pieces = [ckpt.get(n) for n in src.of(expert)]
                out[t.name] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
            else:
                from transformers.integrations.mxfp4 import convert_moe_packed_tensors

                blocks, scales = ckpt.get_rows(src.blocks, expert), ckpt.get_rows(src.scales, expert)
                out[t.name] = convert_moe_packed_tensors(blocks[None], scales[None], dtype=dtype)[0]
        return out

    def read_expert_into(self, ckpt: Checkpoint, layer: int, expert: int, views: dict[str, torch.Tensor]) -> bool:
        """Read one expert straight into its packed views (no temporaries) when the checkpoint already holds
        the compute dtype; False (nothing read) otherwise."""
        reads = []
        for t in self.tensors:
            src, view = self.sources[(layer, t.name)], views[t.name]
            if isinstance(src, Fused):
                reads.append((src.name, view, expert))
            elif isinstance(src, PerExpert):
                row = 0
                for name in src.of(expert):
                    rows = ckpt.shape(name)[0]
                    reads.append((name, view[row: row + rows], None))
                    row += rows
            else:
                return False
        if any(ckpt.dtype(name) != out.dtype for name, out, _ in reads):
            return False
        return all(ckpt.read_into(name, out, index) for name, out, index in reads)

    def fingerprint_sample(self) -> list[str]:
        """Tensors whose bytes go into the fingerprint: every router, and the first sparse layer's experts."""
        routers = tuple(f"{p}." for p in self.router_paths.values())
        names = sorted(n for n, target in self.dense.items() if target.startswith(routers))
        first = self.sparse_layers[0]
        for t in self.tensors:
            names += self.sources[(first, t.name)].names(self.num_experts)
        return names

    def describe(self) -> dict:
        """The structure, for fingerprints and `info`."""
        return {"model_type": self.model_type, "sparse_layers": self.sparse_layers, "num_experts": self.num_experts,
                "top_k": self.top_k, "math": self.math.describe(),
                "tensors": [[t.name, list(t.shape), t.transposed] for t in self.tensors],
                "quantization": self.quantization}

    # -- modules in transformers' model -------------------------------------------------------
    def experts_module(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.experts_paths[layer])

    def pre_moe_norm(self, model: nn.Module, layer: int) -> nn.Module | None:
        path = self.norm_paths.get(layer)
        return model.get_submodule(path) if path else None

    def router(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.router_paths[layer])

    def expert_param_names(self) -> set[str]:
        """The fused experts parameters, which stay on the meta device in the coordinator's model."""
        return {f"{path}.{t.param}" for path in self.experts_paths.values() for t in self.tensors}


def open_layout(ckpt: Checkpoint, config=None) -> tuple[object, FamilyLayout]:
    """(config, layout) for a checkpoint folder, for processes that need no model (the worker, `info`)."""
    config = config or load_config(ckpt)
    quantization = check_quantization(config)
    layout = FamilyLayout(build_meta_model(config), ckpt, quantization)
    layout.validate(ckpt)
    return config, layout


def _find_experts(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """(name of the MoE block within the decoder layer, its experts module), or None for a dense layer."""
    for name, module in layer.named_modules():
        if name.endswith("experts") and hasattr(module, "has_gate") and hasattr(module, "is_transposed"):
            block = name.rpartition(".")[0]
            return block, module
    return None


def _path_of(root: nn.Module, module: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise CheckpointError("cannot locate the decoder in the model")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _check_stacking(converter, name: str) -> None:
    """moeshard reads per-expert tensors when transformers' conversion only stacks them (MergeModulelist on dim
    0) and concatenates the parts (Concatenate on dim 1, i.e. dim 0 of one expert)."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(converter, "operations", [])]
    if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
        raise CheckpointError(f"tensor {name!r}: transformers converts it with {ops}, a layout moeshard does not read")


def _expert_index(pattern: str, renamed: str, name: str) -> int:
    regex = re.escape(pattern.lstrip("^")).replace(r"\*", r"(\d+)")
    match = re.search(regex, renamed)
    if match is None or not match.groups():
        raise CheckpointError(f"tensor {name!r}: cannot find its expert index (pattern {pattern!r})")
    return int(match.group(1))


def _expect_shape(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> None:
    if name not in ckpt:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} is missing tensor {name!r}")
    if tuple(ckpt.shape(name)) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {list(ckpt.shape(name))}, expected {list(shape)} "
                              "from config.json")
