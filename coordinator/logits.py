"""What moeshard does to each step's logits in the batch, on the batching thread: it adds a request's `logit_bias`,
masks the tokens its grammar does not allow (structured output, forced tool calls: `grammar`), chooses its token
(the arg-max, or a draw from the request's own seeded generator) and advances its grammar with it, and records the
model's own log-probabilities of the tokens it generates and, for scoring, of its prompt. transformers' sampler then
can only take the chosen token. Nothing here knows about HTTP or token text.

Log-probabilities are the log-softmax of the model's fp32 logits before logit_bias, temperature and top-p (vLLM's
default, "raw"; OpenAI's do not change with temperature either): what the model predicts, not what was drawn from.

The first rows of a step's logits are the requests that get a token in that step, in the order
`prepare_tensor_args` sees them (a step is prepared and computed on one thread, one at a time: moeshard's manager
runs synchronously); transformers pads the rest to one row per sequence, and their tokens are never used.
R = rows, V = vocabulary, Q = a sequence's query tokens in the step, D = hidden size, K = constrained rows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from .sampling import TokenLogprob

if TYPE_CHECKING:
    from .grammar import Constraint, Grammars

GREEDY = -2  # `choose` for the arg-max (first index on ties, as `generate`'s greedy search); >= 0 is a seed
NO_LOGPROBS = -1  # `logprobs` of a request that asked for none


def entry(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability in `logprobs` ([V], a log-softmax) and the `top` likeliest tokens'."""
    values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
    return TokenLogprob(token, float(logprobs[token]), tuple(zip(ids.tolist(), values.tolist())))


class Observe(ContinuousBatchingLogitsProcessor):
    """The first logits processor of every step: keeps the log-softmax of the model's logits for each row whose
    request asked for log-probabilities (`ChooseToken` completes the record), then adds each request's logit bias,
    passed as ((token ids), (biases)), then sets to -inf every token that the grammar of a row's request (in
    `grammars`, by request id) does not allow next: the masks of all constrained rows are computed together."""

    supported_kwargs = {"logprobs": int, "logit_bias": tuple}
    ignored_kwargs = ()

    def __init__(self, grammars: Grammars | None = None):
        self.grammars = grammars
        self.rows: list = []  # this step's RequestState per row
        self.raw: dict[int, torch.Tensor] = {}  # row -> log-softmax [V] of the model's own logits
        self.constraints: dict[int, Constraint] = {}  # row -> its request's grammar, this step

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        self.rows = [request.state for request in requests_with_new_token]
        return torch.zeros(len(self.rows), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:  # scores [R, V]
        if scores.size(0) < len(self.rows):
            raise RuntimeError(f"{scores.size(0)} rows of logits for {len(self.rows)} requests: this transformers "
                               "version's continuous batching is not the one moeshard expects")
        self.raw = {}
        for row, state in enumerate(self.rows):
            options = state.logit_processor_kwargs
            if options.get("logprobs", NO_LOGPROBS) != NO_LOGPROBS:
                self.raw[row] = torch.log_softmax(scores[row], dim=-1)  # [V]
            if options.get("logit_bias"):
                ids, biases = options["logit_bias"]
                scores[row, torch.tensor(ids, device=scores.device)] += torch.tensor(biases, dtype=scores.dtype,
                                                                                    device=scores.device)
        self.constraints = {}
        if self.grammars is not None and self.grammars.active:
            for row, state in enumerate(self.rows):
                constraint = self.grammars.of(state.request_id)
                if constraint is not None:
                    self.constraints[row] = constraint
        if self.constraints:
            rows = torch.tensor(list(self.constraints), device=scores.device)
            allowed = self.grammars.allowed(list(self.constraints.values()), scores.size(1))  # [K, V]
            scores[rows] = scores[rows].masked_fill(~allowed.to(scores.device), float("-inf"))
        return scores

    def chosen(self, row: int, token: int) -> None:
        """`ChooseToken` chose `token` for `row`: its grammar, if it has one, moves past it."""
        constraint = self.constraints.get(row)
        if constraint is not None:
            constraint.advance(token)


class ChooseToken(ContinuousBatchingLogitsProcessor):
    """The last logits processor of every step: a greedy request's row becomes one-hot at its arg-max, any other's
    one-hot at a token drawn from its own generator (seeded by the request's seed and its token's position, so its
    tokens do not depend on the batch); the row's grammar advances past it (`observed.chosen`), and
    `record(request_id, entry)` gets the log-probabilities `observed` kept."""

    supported_kwargs = {"choose": int}
    ignored_kwargs = ()

    def __init__(self, observed: Observe, record: Callable[[str, TokenLogprob], None]):
        self.observed, self.record = observed, record
        self.count = 0  # rows that choose a token in this step

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(GREEDY)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        keys = []
        for request in requests_with_new_token:
            choose = request.state.logit_processor_kwargs.get("choose", GREEDY)
            if choose >= 0:  # a seed: one generator per (seed, position), independent of the batch
                choose = hash((choose, request.state.generated_len())) & 0x7FFFFFFF
            keys.append(choose)
        self.count = len(keys)
        return torch.tensor(keys, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:  # scores [R, V]
        keys = tensor_arg[: min(self.count, scores.size(0))].tolist()
        for row, key in enumerate(keys):
            if key == GREEDY:
                token = int(scores[row].argmax())
            else:
                generator = torch.Generator(device=scores.device).manual_seed(key)
                token = int(torch.multinomial(torch.softmax(scores[row], dim=-1), 1, generator=generator))
            scores[row].fill_(float("-inf"))
            scores[row, token] = 0.0
            self.observed.chosen(row, token)
            raw = self.observed.raw.get(row)
            if raw is not None:
                state = self.observed.rows[row]
                self.record(state.request_id, entry(raw, token, state.logit_processor_kwargs["logprobs"]))
        return scores


def score_prompt(hidden: torch.Tensor, positions: list[int], prompt_ids: list[int], lm_head: torch.nn.Module,
                 top: int) -> list[tuple[int, TokenLogprob]]:
    """(index, entry) for each prompt token that this chunk of a prefill predicts: the hidden state at position p
    ([Q, D], the decoder's last, all positions) gives the logits of token p + 1, through the model's own LM head, as
    its forward does for the positions it keeps (every family moeshard runs applies nothing after the LM head)."""
    rows = [i for i, p in enumerate(positions) if p + 1 < len(prompt_ids)]
    if not rows:
        return []
    logits = lm_head(hidden[rows]).float()  # [rows, V]
    logprobs = torch.log_softmax(logits, dim=-1)
    out = []
    for k, i in enumerate(rows):
        index = positions[i] + 1
        out.append((index, entry(logprobs[k], prompt_ids[index], top)))
    return out
