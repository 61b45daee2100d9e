"""Family adapters: what a checkpoint's names mean for one MoE family, and where its modules live.

An adapter knows names and shapes only. Routing stays transformers' own (the MoE block keeps its
router); the adapter says which tensors are experts, how to read one expert, and how it computes.
Adding Qwen-MoE, OLMoE or DeepSeek means adding one adapter to `ADAPTERS`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpoint, CheckpointError

# T = tokens, D = hidden size, I = expert intermediate size, E = experts per layer


@dataclass(frozen=True)
class ExpertShape:
    """Shapes of one expert's tensors, in moeshard's packed naming."""

    tensors: dict[str, tuple[int, ...]]


class MixtralAdapter:
    """Mixtral-style experts: `down(act(gate(x)) * up(x))`, softmax-top-k router, every layer sparse."""

    model_types = ("mixtral",)
    _expert_re = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.")

    def __init__(self, config):
        self.config = config
        self.num_layers: int = config.num_hidden_layers
        self.num_experts: int = config.num_local_experts
        self.top_k: int = config.num_experts_per_tok
        self.hidden_size: int = config.hidden_size
        self.intermediate_size: int = config.intermediate_size

    # -- names -------------------------------------------------------------------------------
    def is_expert_tensor(self, name: str) -> bool:
        return self._expert_re.match(name) is not None

    def model_name(self, checkpoint_name: str) -> str:
        """Checkpoint name -> parameter name in transformers' module tree (see its conversion_mapping)."""
        return checkpoint_name.replace(".block_sparse_moe.", ".mlp.")

    def expert_param_names(self, layer: int) -> list[str]:
        """The fused parameters that stay on the meta device in the coordinator's model."""
        return [f"model.layers.{layer}.mlp.experts.gate_up_proj", f"model.layers.{layer}.mlp.experts.down_proj"]

    def moe_layers(self) -> list[int]:
        return list(range(self.num_layers))

    # -- expert weights ----------------------------------------------------------------------
    def expert_shape(self) -> ExpertShape:
        D, I = self.hidden_size, self.intermediate_size
        return ExpertShape({"gate_up": (2 * I, D), "down": (D, I)})

    def _per_expert_names(self, layer: int, expert: int) -> dict[str, str]:
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return {"w1": f"{prefix}.w1.weight", "w3": f"{prefix}.w3.weight", "w2": f"{prefix}.w2.weight"}

    def _fused_names(self, layer: int) -> dict[str, str]:
        prefix = f"model.layers.{layer}.mlp.experts"
        return {"gate_up": f"{prefix}.gate_up_proj", "down": f"{prefix}.down_proj"}

    def validate(self, ckpt: Checkpoint) -> None:
        """Every expert tensor present with the shape the config implies; raises CheckpointError otherwise."""
        D, I, E = self.hidden_size, self.intermediate_size, self.num_experts
        for layer in self.moe_layers():
            fused = self._fused_names(layer)
            if fused["gate_up"] in ckpt:
                expected = {fused["gate_up"]: (E, 2 * I, D), fused["down"]: (E, D, I)}
            else:
                expected = {}
                for e in range(E):
                    names = self._per_expert_names(layer, e)
                    expected.update({names["w1"]: (I, D), names["w3"]: (I, D), names["w2"]: (D, I)})
            for name, shape in expected.items():
                if name not in ckpt:
                    raise CheckpointError(
                        f"checkpoint {str(ckpt.path)!r} is missing tensor {name!r} "
                        f"(expected by the {self.model_types[0]} adapter for layer {layer})"
                    )
                if ckpt.shape(name) != shape:
                    raise CheckpointError(
                        f"tensor {name!r} has shape {list(ckpt.shape(name))}, expected {list(shape)} from config.json"
                    )

    def read_expert(self, ckpt: Checkpoint, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's weights, read lazily from the checkpoint: {'gate_up': [2I, D], 'down': [D, I]}."""
        fused = self._fused_names(layer)
        if fused["gate_up"] in ckpt:
            return {"gate_up": ckpt.get_rows(fused["gate_up"], expert), "down": ckpt.get_rows(fused["down"], expert)}
        names = self._per_expert_names(layer, expert)
        w1, w3, w2 = (ckpt.get(names[k]) for k in ("w1", "w3", "w2"))
        return {"gate_up": torch.cat([w1, w3], dim=0), "down": w2}

    def read_expert_into(self, ckpt: Checkpoint, layer: int, expert: int, views: dict[str, torch.Tensor]) -> bool:
        """Read one expert straight into its packed views (no temporaries) when the checkpoint already holds
        the compute dtype; False (nothing read) otherwise."""
        fused = self._fused_names(layer)
        I = self.intermediate_size
        if fused["gate_up"] in ckpt:
            reads = [(fused["gate_up"], views["gate_up"], expert), (fused["down"], views["down"], expert)]
        else:
            names = self._per_expert_names(layer, expert)
            reads = [(names["w1"], views["gate_up"][:I], None), (names["w3"], views["gate_up"][I:], None),
                     (names["w2"], views["down"], None)]
        dtype = views["down"].dtype
        if any(ckpt.dtype(name) != dtype for name, _, _ in reads):
            return False
        return all(ckpt.read_into(name, out, index) for name, out, index in reads)

    def fingerprint_sample(self, ckpt: Checkpoint) -> list[str]:
        """Tensors whose bytes go into the fingerprint: every router, and the first layer's experts."""
        names = [n for n in ckpt.names if n.endswith((".block_sparse_moe.gate.weight", ".mlp.gate.weight"))]
        first = self.moe_layers()[0]
        fused = self._fused_names(first)
        if fused["gate_up"] in ckpt:
            return names + list(fused.values())
        for e in range(self.num_experts):
            names += list(self._per_expert_names(first, e).values())
        return names

    def expert_forward(self, weights: dict[str, torch.Tensor], x: torch.Tensor, act: Callable) -> torch.Tensor:
        """x [T, D] -> [T, D]; the same arithmetic as transformers' MixtralExperts on one expert."""
        gate, up = F.linear(x, weights["gate_up"]).chunk(2, dim=-1)  # [T, I] each
        return F.linear(act(gate) * up, weights["down"])

    # -- modules in transformers' model ------------------------------------------------------
    def decoder_layer(self, model: nn.Module, layer: int) -> nn.Module:
        return model.model.layers[layer]

    def experts_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.decoder_layer(model, layer).mlp.experts

    def pre_moe_norm(self, model: nn.Module, layer: int) -> nn.Module:
        return self.decoder_layer(model, layer).post_attention_layernorm

    def router_logits(self, model: nn.Module, layer: int, residual: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s router logits for a residual-stream state [T, D] (its norm, then its gate)."""
        normed = self.pre_moe_norm(model, layer)(residual)
        return self.decoder_layer(model, layer).mlp.gate(normed)[0]  # [T, E]


ADAPTERS: dict[str, type] = {t: MixtralAdapter for t in MixtralAdapter.model_types}


def adapter_for(config) -> MixtralAdapter:
    """The adapter for a transformers config; a clear error for a family moeshard does not know."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise CheckpointError(
            f"model_type {model_type!r} is not a supported MoE family: expected one of {sorted(ADAPTERS)} "
            "(a Mixture-of-Experts checkpoint)"
        )
    return ADAPTERS[model_type](config)
