"""The offloaded MoE layer, plugged into transformers through its experts interface.

transformers' MoE block routes (ROUTE: router logits, top-k, weights, the family's own rule) and then
calls the function registered under `config._experts_implementation`. moeshard registers "moeshard",
whose `MoELayer` does DISPATCH (group tokens by expert, one request per owner), EXPERTS (the owners
compute) and COMBINE (weighted sum in token order, the same arithmetic as transformers' grouped_mm,
so the result does not depend on who ran an expert). It also predicts the next layer's experts from
the current residual stream and sends prefetch hints.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .experts import check_finite
from .runtime import ExpertRuntime

# T = tokens, K = experts per token, E = experts per layer, D = hidden size

IMPLEMENTATION = "moeshard"
_ATTR = "_moeshard_layer"


def _moeshard_experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    layer = getattr(experts, _ATTR, None)
    if layer is None:
        raise RuntimeError(
            f"experts_implementation={IMPLEMENTATION!r} only works on a model built by offload_core.load_model"
        )
    return layer(hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    """Register moeshard in transformers' experts registry (idempotent; the registry is meant for this)."""
    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _moeshard_experts_forward)


class MoELayer:
    """DISPATCH, EXPERTS and COMBINE for one layer; attached to that layer's experts module."""

    def __init__(self, layer: int, num_experts: int, runtime: ExpertRuntime, prefetch: int = 0,
                 next_layer: int | None = None, predictor: Callable[[torch.Tensor], tuple] | None = None):
        self.layer, self.num_experts, self.runtime = layer, num_experts, runtime
        self.prefetch = prefetch  # m: experts per token predicted for the next MoE layer (0 = off)
        self.next_layer = next_layer  # the next *sparse* layer, whose experts are predicted
        # residual [T, D] -> the next MoE layer's router output (logits [T, E], weights [T, K], indices [T, K])
        self.predictor = predictor
        self._residual: torch.Tensor | None = None

    def attach(self, experts: nn.Module, pre_moe_norm: nn.Module | None) -> None:
        setattr(experts, _ATTR, self)
        if pre_moe_norm is not None and self.predictor is not None and self.prefetch > 0:
            # The norm's input is the residual stream right before this layer's MoE: the state from which
            # the next layer's router is applied speculatively.
            pre_moe_norm.register_forward_pre_hook(self._capture_residual)

    def _capture_residual(self, module: nn.Module, args) -> None:
        self._residual = args[0]

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        T, K = top_k_index.shape
        flat = top_k_index.reshape(-1)  # [T*K]
        order = torch.argsort(flat, stable=True)  # [T*K] positions grouped by expert, token order within
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync per layer
        experts = [e for e, c in enumerate(counts) if c]
        routed = hidden[order // K]  # [T*K, D] token states in expert order
        groups = dict(zip(experts, routed.split([counts[e] for e in experts])))

        residual, self._residual = self._residual, None  # [B, S, D] before this layer's MoE (prefetch only)
        hint = self._predict_next(residual)  # early guess: its loads overlap this layer's experts
        pending = self.runtime.submit(self.layer, groups, hint)  # loads and remote requests start now
        computed = pending.result()
        outputs, dropped = computed.outputs, computed.dropped  # dropped: only if the plane drops unavailable experts

        weights = top_k_weights.reshape(-1)[order]  # [T*K] in expert order
        if dropped:
            outputs, weights = self._drop(experts, counts, outputs, weights, order, top_k_weights, dropped, hidden)
        out = torch.cat([outputs[e] for e in experts])  # [T*K, D] in expert order
        if not bool(torch.isfinite(out).all()):  # never garbage into the residual stream: name who made it
            check_finite(self.layer, outputs)
        weighted = out * weights.unsqueeze(-1)  # float32 like transformers
        combined = torch.empty_like(weighted)
        combined[order] = weighted  # back to (token, k) order
        result = combined.view(T, K, -1).sum(dim=1).to(hidden.dtype)  # [T, D]
        if residual is not None:
            # Refined guess from the residual stream as the next layer will receive it (this layer's output
            # added): more accurate, and its loads still overlap the next layer's attention.
            refined = self._predict_next(residual.reshape(T, -1) + result)
            if refined is not None:
                self.runtime.prefetch(*refined)
        return result

    def _drop(self, experts, counts, outputs, weights, order, top_k_weights, dropped, hidden):
        """Zero the dropped experts' outputs and rescale each token's remaining weights to the same total."""
        K = top_k_weights.shape[1]
        keep = torch.cat([torch.full((counts[e],), e not in dropped, device=weights.device) for e in experts])
        kept = torch.empty_like(keep)
        kept[order] = keep  # [T*K] in (token, k) order
        w = top_k_weights.reshape(-1) * kept
        total, remaining = top_k_weights.sum(-1), w.view(-1, K).sum(-1)  # [T]
        scale = torch.where(remaining > 0, total / remaining.clamp_min(1e-30), torch.zeros_like(total))
        w = (w.view(-1, K) * scale.unsqueeze(-1)).reshape(-1)
        zeros = {e: torch.zeros(counts[e], hidden.shape[-1], dtype=hidden.dtype, device=hidden.device) for e in dropped}
        return {**outputs, **zeros}, w[order]

    def _predict_next(self, residual: torch.Tensor | None) -> tuple[int, list[int]] | None:
        """The next MoE layer's likely experts, most voted first: its own norm and router (the family's routing
        rule: grouped top-k, sparsemixer, correction bias...) applied to a residual-stream state. Each token
        votes for the router's choices, best first, then (when m > K) the next ones by router logit."""
        if residual is None or self.next_layer is None:
            return None
        with torch.no_grad():
            logits, weights, indices = self.predictor(residual.reshape(-1, residual.shape[-1]))  # [T,E] [T,K] [T,K]
            m, K = self.prefetch, indices.shape[-1]
            chosen = indices.gather(-1, weights.float().argsort(dim=-1, descending=True, stable=True))  # [T, K]
            if m <= K:
                top = chosen[:, :m]  # [T, m]
            else:
                score = logits.float().scatter(-1, chosen, float("inf"))  # the router's choices first
                top = torch.topk(score, m, dim=-1).indices  # [T, m]
            ids, votes = torch.unique(top, return_counts=True)
        # Most-voted first (ties: lower expert id); each owner loads as many as its slots hold.
        ranked = sorted(zip(votes.tolist(), ids.tolist()), key=lambda vc: (-vc[0], vc[1]))
        return self.next_layer, [e for _, e in ranked]


def next_layer_predictor(norm: nn.Module | None, router: nn.Module) -> Callable[[torch.Tensor], tuple]:
    """residual [T, D] -> router(norm(residual)): the next layer's routing as it would be decided now."""
    def predict(residual: torch.Tensor) -> tuple:
        out = router(norm(residual) if norm is not None else residual)
        return out[0], out[1], out[2]  # (logits, weights, indices), the tuple every decorated family's router returns

    return predict
