"""The benchmark checkpoints, written straight to safetensors in each family's own naming.

Three kinds: `mixtral` (the paper's architecture: 8 large experts, top-2), `many-experts` (Qwen3-MoE's: 64
small experts, top-8, what people run at home now, where per-expert work rather than bandwidth is the cost) and
`qwen3-30b-a3b` (two layers of that model's real shape, bf16: per-layer rates project to the whole model).
Random weights (seeded), scaled so the residual stream behaves like a trained model's: each layer adds a small
update to a large residual (output projections at 1/10 of the usual init), so consecutive layers see similar
states and routers, sharpened, are decisive. Written tensor by tensor, so a multi-GB checkpoint needs little
RAM and no model object.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

from .cli import KINDS  # noqa: F401  (re-exported: the kinds of benchmark model)


@dataclass(frozen=True)
class BenchModelSpec:
    family: str = "mixtral"  # transformers model_type: "mixtral" or "qwen3_moe"
    hidden_size: int = 1024
    intermediate_size: int = 2048  # of one expert
    num_hidden_layers: int = 8
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    vocab_size: int = 4096
    head_dim: int | None = None  # None = hidden_size / num_attention_heads
    dtype: str = "float32"
    seed: int = 0
    version: int = 3  # bump when the weights' recipe changes, so cached checkpoints are rewritten

    @classmethod
    def of_kind(cls, kind: str, **overrides) -> BenchModelSpec:
        """The default spec of a kind (`KINDS`); `overrides` replace fields (None ones are ignored)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if kind == "mixtral":
            return cls(**overrides)
        if kind == "many-experts":  # Qwen3-MoE architecture: 64 experts of 1.5 MB, top-8, 12 layers = 1.2 GB fp32
            return cls(**{**dict(family="qwen3_moe", hidden_size=512, intermediate_size=256, num_hidden_layers=12,
                                 num_local_experts=64, num_experts_per_tok=8, num_attention_heads=8,
                                 num_key_value_heads=4), **overrides})
        if kind == "qwen3-30b-a3b":  # Qwen3-30B-A3B's layer: 128 experts of 768, top-8, 32/4 heads of 128; bf16
            # Two of its 48 layers and a 4096-token vocabulary (its own is 151,936: an LM head of 311 M weights
            # would dwarf two layers); rates are reported per layer and projected to 48.
            return cls(**{**dict(family="qwen3_moe", hidden_size=2048, intermediate_size=768, num_hidden_layers=2,
                                 num_local_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                 num_key_value_heads=4, head_dim=128, dtype="bfloat16"), **overrides})
        raise ValueError(f"benchmark model kind must be one of {list(KINDS)}, got {kind!r}")

    def expert_bytes(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size * getattr(torch, self.dtype).itemsize

    def total_expert_bytes(self) -> int:
        return self.expert_bytes() * self.num_local_experts * self.num_hidden_layers

    def config(self):
        from transformers import AutoConfig

        common = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                      num_key_value_heads=self.num_key_value_heads, num_experts_per_tok=self.num_experts_per_tok,
                      max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        if self.family == "mixtral":
            config = AutoConfig.for_model("mixtral", intermediate_size=self.intermediate_size,
                                          num_local_experts=self.num_local_experts, **common)
        else:
            config = AutoConfig.for_model("qwen3_moe", moe_intermediate_size=self.intermediate_size,
                                          intermediate_size=4 * self.intermediate_size, decoder_sparse_step=1,
                                          num_experts=self.num_local_experts, norm_topk_prob=True,
                                          head_dim=self.head_dim or self.hidden_size // self.num_attention_heads,
                                          **common)
        config.dtype = self.dtype
        return config


def make_bench_checkpoint(folder: Path, spec: BenchModelSpec = BenchModelSpec()) -> Path:
    """Write the checkpoint once; an existing folder made from the same spec is reused."""
    folder = Path(folder)
    stamp = folder / "bench_spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(spec):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = spec.config()
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)
    D, I = spec.hidden_size, spec.intermediate_size
    H = spec.head_dim or D // spec.num_attention_heads

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    weight_map = {}

    def write(name: str, tensors: dict) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))

    out_std = 0.002  # attention and expert output projections: small updates to the residual stream
    write("model-dense.safetensors", {"model.embed_tokens.weight": rand(spec.vocab_size, D, std=1.0),
                                      "lm_head.weight": rand(spec.vocab_size, D),
                                      "model.norm.weight": torch.ones(D, dtype=dtype)})
    for layer in range(spec.num_hidden_layers):
        p = f"model.layers.{layer}"
        tensors = {f"{p}.input_layernorm.weight": torch.ones(D, dtype=dtype),
                   f"{p}.post_attention_layernorm.weight": torch.ones(D, dtype=dtype),
                   f"{p}.self_attn.q_proj.weight": rand(spec.num_attention_heads * H, D),
                   f"{p}.self_attn.k_proj.weight": rand(spec.num_key_value_heads * H, D),
                   f"{p}.self_attn.v_proj.weight": rand(spec.num_key_value_heads * H, D),
                   f"{p}.self_attn.o_proj.weight": rand(D, spec.num_attention_heads * H, std=out_std)}
        if spec.family == "mixtral":
            tensors[f"{p}.block_sparse_moe.gate.weight"] = rand(spec.num_local_experts, D, std=0.5)
            for e in range(spec.num_local_experts):
                q = f"{p}.block_sparse_moe.experts.{e}"
                tensors.update({f"{q}.w1.weight": rand(I, D), f"{q}.w3.weight": rand(I, D),
                                f"{q}.w2.weight": rand(D, I, std=out_std)})
        else:  # qwen3_moe: per-expert gate/up/down projections, q/k norms in attention
            tensors.update({f"{p}.self_attn.q_norm.weight": torch.ones(H, dtype=dtype),
                            f"{p}.self_attn.k_norm.weight": torch.ones(H, dtype=dtype),
                            f"{p}.mlp.gate.weight": rand(spec.num_local_experts, D, std=0.5)})
            for e in range(spec.num_local_experts):
                q = f"{p}.mlp.experts.{e}"
                tensors.update({f"{q}.gate_proj.weight": rand(I, D), f"{q}.up_proj.weight": rand(I, D),
                                f"{q}.down_proj.weight": rand(D, I, std=out_std)})
        write(f"model-layer{layer:03d}.safetensors", tensors)
        logger.info("wrote layer %d of %d", layer + 1, spec.num_hidden_layers)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    stamp.write_text(json.dumps(asdict(spec)))
    return folder
