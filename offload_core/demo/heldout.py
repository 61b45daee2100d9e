"""Held-out evaluation for the bundled demo model.

Shared by the training script and the tests so that the reported held-out loss
can be recomputed from ``heldout.txt`` alone, without the CPython stdlib.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_heldout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seq_len: int = 256,
) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` on ``text``.

    The text is tokenized once without special tokens and cut into
    non-overlapping windows of ``seq_len`` tokens; a trailing partial window is
    kept if it has at least two tokens. Every predicted token counts equally.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        for start in range(0, len(ids), seq_len):
            window = ids[start : start + seq_len]
            if len(window) < 2:
                continue
            input_ids = torch.tensor([window], device=device)
            logits = model(input_ids=input_ids).logits.float()
            # Sum rather than mean per window so a short last window is not over-weighted.
            total_nll += F.cross_entropy(
                logits[0, :-1], input_ids[0, 1:], reduction="sum"
            ).item()
            total_tokens += len(window) - 1
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("held-out text is too short to evaluate")
    loss = total_nll / total_tokens
    logger.debug("held-out loss %.4f over %d predicted tokens", loss, total_tokens)
    return loss
