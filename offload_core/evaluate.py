"""Perplexity of a causal LM on a text: mean next-token cross-entropy over non-overlapping windows.

Used by `moe-coordinator perplexity`, the quality table in the README, and the demo model's tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.inference_mode()
def cross_entropy(model, tokenizer, text: str, seq_len: int = 256, progress: bool = False) -> dict:
    """{"loss" (nats/token), "perplexity", "tokens" (predicted tokens)} of `model` on `text`.

    The text is tokenized once without special tokens and cut into windows of `seq_len` tokens; a last
    window of at least two tokens counts too. Every predicted token weighs the same.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    starts = [s for s in range(0, len(ids), seq_len) if len(ids[s:s + seq_len]) >= 2]
    for start in tqdm(starts, desc="perplexity", disable=not progress, unit="window"):
        window = torch.tensor([ids[start:start + seq_len]], device=device)
        logits = model(input_ids=window).logits.float()
        total += F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum").item()  # sums: no window bias
        count += window.shape[1] - 1
    if count == 0:
        raise ValueError("the text is too short: expected at least two tokens")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
