"""Batch-invariant attention for continuous batching: each sequence attends over its own keys only.

transformers' continuous batching computes one step's attention as one call over every sequence's queries and
keys, with a block-diagonal mask. The masked keys add exact zeros, but the reductions over the whole key range
group the real terms differently as the batch changes, so in bfloat16 a sequence's tokens could depend on who
else was in the step (greedy tokens changed after ~30 steps on the demo model). Here the step's attention is
split at the sequence boundaries transformers passes (`cu_seq_lens_q`, `cu_seq_lens_k`), and each slice goes
through the model's own attention (sdpa or eager) with exactly the shapes it has when that sequence runs alone.
A sequence's key range includes the pages it shares with others (prefix reuse): transformers reads them through
the same read indices as its own, so they arrive inside its slice, and nothing here depends on who computed them.
Outside continuous batching (no boundaries) the model's attention runs unchanged. Registered through
transformers' attention and mask interfaces under one name per base; nothing of transformers is patched.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.eager_paged import eager_paged_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

PREFIX = "moeshard_per_sequence_"
# base -> (its attention, its mask); transformers' paged eager is its eager with attention sinks (GPT-OSS), used
# with and without continuous batching alike
BASES = {"sdpa": (sdpa_attention_forward, sdpa_mask), "eager": (eager_paged_attention_forward, eager_mask)}


def _per_sequence(base_attention):
    def attention(module, query, key, value, attention_mask, **kwargs):
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if not isinstance(cu_q, torch.Tensor) or not isinstance(cu_k, torch.Tensor):
            return base_attention(module, query, key, value, attention_mask, **kwargs)
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()  # [B + 1] each: where each sequence's rows start
        outputs = []
        for i in range(len(bounds_q) - 1):
            q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
            if q1 == q0:  # a padding sequence
                continue
            mask = attention_mask[..., q0:q1, k0:k1] if attention_mask is not None else None
            out, _ = base_attention(module, query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], mask, **kwargs)
            outputs.append(out)  # [1, q, H, d]
        if bounds_q[-1] < query.shape[2]:  # padded rows: zeros, as nothing reads them
            outputs.append(query.new_zeros(1, query.shape[2] - bounds_q[-1], query.shape[1], value.shape[-1]))
        return torch.cat(outputs, dim=1), None

    return attention


def register(base: str) -> str | None:
    """The per-sequence implementation of the model's attention `base` ("sdpa", "eager", "paged|eager"),
    registered once; None where the base has no such variant here (flash kernels take sequence boundaries
    themselves)."""
    if base.startswith(PREFIX):  # already per sequence (another batcher on the same model)
        return base
    base = base.removeprefix("paged|")
    if base not in BASES:
        return None
    name = PREFIX + base
    if name not in AttentionInterface._global_mapping:
        attention, mask = BASES[base]
        AttentionInterface.register(name, _per_sequence(attention))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    return name


def is_per_sequence(implementation: str) -> bool:
    return implementation.startswith(PREFIX)


def base_for_batching(implementation: str) -> str:
    """The implementation transformers' continuous batching accepts in place of ours (it checks the model's when a
    manager is built): sdpa, or its paged eager."""
    base = implementation.removeprefix(PREFIX)
    return "paged|eager" if base == "eager" else base
