"""The benchmark checkpoint: a Mixtral-architecture model written straight to safetensors.

Random weights (seeded), scaled so the residual stream behaves like a trained model's: each layer adds a
small update to a large residual (output projections at 1/10 of the usual init), so consecutive layers
see similar states and routers, sharpened, are decisive. Written tensor by tensor, so making a multi-GB
checkpoint needs little RAM and no model object.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import MixtralConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchModelSpec:
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 8
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    vocab_size: int = 4096
    dtype: str = "float32"
    seed: int = 0
    version: int = 2  # bump when the weights' recipe changes, so cached checkpoints are rewritten

    def expert_bytes(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def total_expert_bytes(self) -> int:
        return self.expert_bytes() * self.num_local_experts * self.num_hidden_layers


def make_bench_checkpoint(folder: Path, spec: BenchModelSpec = BenchModelSpec()) -> Path:
    """Write the checkpoint once; an existing folder made from the same spec is reused."""
    folder = Path(folder)
    stamp = folder / "bench_spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(spec):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = MixtralConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                           intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                           num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                           num_local_experts=spec.num_local_experts, num_experts_per_tok=spec.num_experts_per_tok,
                           max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config.dtype = spec.dtype
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)
    D, I = spec.hidden_size, spec.intermediate_size
    H = config.head_dim or D // spec.num_attention_heads

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
                   f"{p}.self_attn.o_proj.weight": rand(D, spec.num_attention_heads * H, std=out_std),
                   f"{p}.block_sparse_moe.gate.weight": rand(spec.num_local_experts, D, std=0.5)}
        for e in range(spec.num_local_experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            tensors.update({f"{q}.w1.weight": rand(I, D), f"{q}.w3.weight": rand(I, D),
                            f"{q}.w2.weight": rand(D, I, std=out_std)})
        write(f"model-layer{layer:03d}.safetensors", tensors)
        logger.info("wrote layer %d of %d", layer + 1, spec.num_hidden_layers)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    stamp.write_text(json.dumps(asdict(spec)))
    return folder
