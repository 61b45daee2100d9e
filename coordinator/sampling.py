"""What a generation asks for (`SamplingParams`) and what it gives back (`GenerationResult`, with the model's
log-probabilities as `TokenLogprob`s): plain values, shared by the engine, the batch and the server. No model here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

MAX_LOGPROBS = 20  # the most likely tokens reported per position (OpenAI's chat limit; vLLM's default)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64  # tokens to generate at most; 0 only scores the prompt (prompt_logprobs)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass, 0 < top_p <= 1
    seed: int | None = None  # makes sampling repeatable
    stop: tuple[str, ...] = ()  # stop when the text ends with one of these
    logprobs: int | None = None  # None: none recorded; N: each new token's log-probability and the N likeliest
    prompt_logprobs: bool = False  # also each prompt token's but the first (needs logprobs)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) pairs added to the logits before the choice
    grammar: str | None = None  # an llguidance grammar (`grammar.Grammars`) that the new tokens must follow
    skip_special_tokens: bool = True  # the text leaves special tokens out; False keeps them (tool-call markers)

    def __post_init__(self):
        if self.max_new_tokens < (0 if self.prompt_logprobs else 1):
            raise ValueError(f"max_new_tokens must be >= 1 (0 only to score the prompt), got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs and self.logprobs is None:
            raise ValueError("prompt_logprobs needs logprobs (how many likeliest tokens to report, 0 or more)")
        if len({token for token, _ in self.logit_bias}) != len(self.logit_bias):
            raise ValueError("logit_bias names a token twice")


class TokenLogprob(NamedTuple):
    """One position's log-probabilities: the model's log-softmax of the logits that chose (or, in a prompt, predict)
    `token`."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the N likeliest (token, logprob), likeliest first


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: dict = field(default_factory=dict)
    token_times: list[float] = field(default_factory=list)  # perf_counter() when each new token was decoded
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None for the first), when asked
