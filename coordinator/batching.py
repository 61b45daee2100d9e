"""Continuous batching: many generations decoded together, step by step, on one offloaded model.

This is transformers' own continuous-batching manager and paged KV cache (`init_continuous_batching`),
unchanged: a background thread runs one step at a time; a request joins at the next step and leaves when it
ends (EOS, its `max_tokens`, a stop string, or its caller going away), without waiting for the others. Each
step is one forward over the tokens of every sequence in it, so a MoE layer sees them all at once: its
experts are grouped over the whole batch, loaded once and computed once per step, and each remote worker gets
one request per layer for the batch. A long prompt is prefilled in chunks of `step_tokens`, with the decoding
sequences served first in every step, so it never holds the others back by more than one step. A prompt that begins
with whole KV pages computed before (a shared system prompt, a conversation that grows) reuses them: transformers'
prefix sharing, which also saves the experts those tokens would have loaded.

What moeshard adds: admission (a bounded queue, `Overloaded` beyond it), what happens to each step's logits
(`logits`: logit bias; a request's grammar, `grammar`, masking what it does not allow; the choice of each token,
greedy as the arg-max of fp32 logits like `generate`, sampled from the request's own generator so that its tokens do
not depend on what else is in the batch; the model's own log-probabilities of new tokens and, for scoring, of the
prompt), stop strings and cancellation, text streaming, per-request timing, per-step figures, and a restart of the
manager after a step fails.
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, PreTrainedTokenizerBase, TextStreamer
from transformers.generation.continuous_batching.requests import RequestStatus

from .invariant_attention import base_for_batching, is_per_sequence, register
from .grammar import Grammars
from .logits import GREEDY, NO_LOGPROBS, ChooseToken, Observe, score_prompt
from .sampling import GenerationResult, SamplingParams, TokenLogprob

logger = logging.getLogger(__name__)

DEFAULT_KV_TOKENS_PER_SEQUENCE = 4096  # the default KV cache holds this many tokens per sequence (or the context)


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 8  # sequences decoded together in one step
    max_queue: int = 64  # requests waiting for a place in the batch; beyond: Overloaded (HTTP 429)
    step_tokens: int = 256  # tokens one step computes at most: prompts are prefilled in chunks of this size
    kv_tokens: int | None = None  # paged KV cache size in tokens; None: max_batch x min(context, 4096)
    page_size: int = 32  # tokens per KV cache page
    batch_invariant: bool = True  # attention per sequence: greedy tokens do not depend on the batch (any dtype)
    # a prompt starting with whole KV pages already computed (a shared system prompt, a conversation that grows)
    # reuses them instead of recomputing them: transformers' prefix sharing, on models with full attention only
    prefix_cache: bool = True

    def __post_init__(self):
        for name in ("max_batch", "step_tokens", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.step_tokens < self.max_batch:
            raise ValueError(f"step_tokens ({self.step_tokens}) must be >= max_batch ({self.max_batch}): every "
                             "sequence of a full batch needs one token per step")
        if self.kv_tokens is not None and self.kv_tokens < self.page_size:
            raise ValueError(f"kv_tokens must be >= page_size ({self.page_size}), got {self.kv_tokens}")

    def cache_tokens(self, context_length: int) -> int:
        if self.kv_tokens is not None:
            return self.kv_tokens
        per_sequence = min(context_length or DEFAULT_KV_TOKENS_PER_SEQUENCE, DEFAULT_KV_TOKENS_PER_SEQUENCE)
        return self.max_batch * per_sequence


class ModelHost(Protocol):
    """What a batch needs of an engine (`engine.Engine` is one): transformers' model, its tokenizer, its context."""
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    context_length: int


class Overloaded(Exception):
    """The batch and its queue are full: come back in `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationFailed(RuntimeError):
    """A step that this request was part of failed (e.g. a worker its experts needed was down with
    --no-local-fallback); the server keeps serving."""


def _install(manager, observe: Observe, choose: ChooseToken) -> None:
    """Puts `observe` first and `choose` last in the manager's per-request logits processors (before its thread
    starts, when the argument buffers are sized): `observe` sees the model's own logits, `choose` the processed."""
    processors = manager.logit_processor
    if not all(hasattr(processors, a) for a in ("logits_processor", "tensors_required", "supported_keys")):
        raise RuntimeError("this transformers version's continuous batching has no per-request logits processors "
                           "as moeshard expects: install the transformers version pyproject.toml names")
    processors.logits_processor.insert(0, observe)
    processors.logits_processor.append(choose)
    processors.tensors_required += 2
    for processor in (observe, choose):
        processors.supported_keys.update(processor.supported_kwargs)
    processors.do_processing = True


class _TextOut(TextStreamer):
    """transformers' TextStreamer for the new tokens only, handing finished text to a callback."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None, skip_special_tokens: bool = True):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=skip_special_tokens)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.on_text is not None and text:
            self.on_text(text)


@dataclass
class _Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    out: _TextOut
    done: asyncio.Future
    submitted: float
    on_first_token: Callable[[], None] | None = None
    interrupt: threading.Event | None = None  # set by the caller: stop at the next step, keep what was decoded
    on_logprobs: Callable[[list[TokenLogprob | None], bool], None] | None = None  # (entries, of the prompt)
    cached_tokens: int = 0  # prompt tokens whose KV pages were reused, not computed (written on the batching thread)
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    finish: str | None = None
    # written on the batching thread during a step, read on the event loop once the step's tokens are delivered
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token chosen, when asked for
    prompt_logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # prompt index -> entry, when asked for


class Place:
    """A place in a `Batcher`'s batch or queue, from `Batcher.hold`: taken by `generate`, or released (both once)."""

    def __init__(self, batcher: Batcher):
        self.batcher, self.open = batcher, True

    def take(self) -> bool:
        if not self.open:
            return False
        self.open = False
        self.batcher._held -= 1
        return True

    release = take


@dataclass
class StepStats:
    steps: int = 0
    sequences: int = 0  # summed over steps: sequences / steps is the mean batch size
    tokens: int = 0  # query tokens computed (prefill chunks + one per decoding sequence)
    seconds: float = 0.0
    max_step_s: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (sequences, tokens, seconds) per step


class Batcher:
    """Continuous batching over one engine (`engine.Engine`): `await batcher.generate(prompt_ids, params, on_text)`
    from any number of tasks on one event loop. `start()` once, `close()` at the end."""

    def __init__(self, engine: ModelHost, cfg: BatchConfig = BatchConfig(),
                 on_step: Callable[[int, int, float], None] | None = None):
        self.engine, self.cfg, self.on_step = engine, cfg, on_step
        self.model = engine.model
        self.manager = None
        self.live: dict[str, _Request] = {}
        self.step_stats = StepStats()
        self.restarts = 0
        self._lock = threading.Lock()  # manager (re)creation
        self._step_start = 0.0
        self._step_shape = (0, 0)
        self._hooks = []
        self._durations: deque[float] = deque(maxlen=64)  # recent request durations, for Retry-After
        self._attention: str | None = None  # the model's own attention while the per-sequence one is in use
        self._held = 0  # places held by `hold` for requests not yet in `live`
        self._scoring = 0  # live requests that score their prompt
        self._step_scores = False  # a request scored its prompt when this step began: the decoder's hook looks
        self._positions: list[int] = []  # the step's query positions and sequence bounds, when it does
        self._bounds: list[int] = []
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.num_blocks = max(1, math.ceil(self.cfg.cache_tokens(engine.context_length) / self.cfg.page_size))
        # requests' grammars (structured output, forced tool calls); llguidance is loaded only when one is used
        self.grammars = Grammars(engine.tokenizer, int(self.model.config.vocab_size), self.eos_ids)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the batching loop now (else the first request starts it)."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if not self._hooks:
            self._hooks = [self.model.register_forward_pre_hook(self._before_step, with_kwargs=True),
                           self.model.register_forward_hook(self._after_step),
                           self.model.get_decoder().register_forward_hook(self._score_prompts)]
        if self.manager is None:
            self._start_manager()

    def _use_invariant_attention(self, original: str) -> None:
        """Each sequence attends over its own keys (see invariant_attention): greedy tokens do not depend on the
        batch. Kept while this batcher runs; `original`, the model's own, is restored at close."""
        name = register(self.model.config._attn_implementation)
        if name is None:
            logger.warning("attention %r has no per-sequence variant: greedy tokens may depend on the batch",
                           self.model.config._attn_implementation)
            return
        self._attention = original
        self.model.set_attn_implementation(name)

    def _start_manager(self) -> None:
        current = self.model.config._attn_implementation
        ours = is_per_sequence(current)  # another batcher on this model (or this one, restarting) switched it
        if ours:  # transformers checks the model's attention when it builds a manager: show it the base
            self.model.set_attn_implementation(base_for_batching(current))
        eos = sorted(self.eos_ids) or None
        # The base config only makes transformers build its per-request temperature and top-p processors; every
        # request passes its own values.
        generation = GenerationConfig(do_sample=True, temperature=0.5, top_p=0.5, top_k=0,
                                      eos_token_id=eos if eos is None or len(eos) > 1 else eos[0],
                                      pad_token_id=eos[0] if eos else 0)
        batching = ContinuousBatchingConfig(
            page_size=self.cfg.page_size, num_blocks=self.num_blocks, max_batch_tokens=self.cfg.step_tokens,
            max_requests_per_batch=self.cfg.max_batch, per_request_processors=True,
            # moeshard's experts move weights and call workers inside the forward: no graphs, no compile, no
            # double-buffered steps; and no flash attention swapped in behind the user's back
            use_cuda_graph=False, use_async_batching=False, default_compile_level=0, auto_switch_to_flash=False,
            allow_block_sharing=self.cfg.prefix_cache)
        manager = self.model.init_continuous_batching(generation_config=generation,
                                                      continuous_batching_config=batching)
        observe = Observe(self.grammars)
        _install(manager, observe, ChooseToken(observe, self._record))
        # The batch processor decides when it is created whether to build attention masks (for the model's own sdpa or
        # paged eager only), and the loop reuses one that exists: create it before the switch.
        manager.batch_processor = manager._create_batch_processor()  # in the mode the loop runs in
        self._share_prefixes(manager.batch_processor.cache)
        if self.cfg.batch_invariant or ours:
            if ours:
                self.model.set_attn_implementation(current)
            elif self._attention is None:
                self._use_invariant_attention(current)
        manager.start()
        self.manager = manager

    def _share_prefixes(self, cache) -> None:
        """Prefix reuse as transformers' scheduler does it (`search_prefix_match` when a request is first scheduled),
        with two additions: a request that scores its prompt needs every prompt position's hidden states, so it never
        starts from cached pages (its own are still offered to those after it); every other records how many prompt
        tokens it reused (usage's cached_tokens). Wraps this manager's cache object only."""
        if not getattr(cache, "use_prefix_sharing", False):  # off, or a model with sliding-window layers
            return
        search = getattr(cache, "search_prefix_match", None)
        if search is None:
            raise RuntimeError("this transformers version's paged cache has no search_prefix_match as moeshard "
                               "expects: install the transformers version pyproject.toml names")

        def search_prefix_match(request_id: str, prompt_ids: list[int]) -> int:  # on the batching thread
            req = self.live.get(request_id)
            if req is None or req.params.prompt_logprobs:
                return 0
            reused = search(request_id, prompt_ids)
            if not req.token_ids:  # a request restarted after its first token keeps the count it was reported with
                req.cached_tokens = reused
            return reused

        cache.search_prefix_match = search_prefix_match

    def _ensure_running(self) -> None:
        """After a step failed (every request in the manager was failed and told), a fresh manager."""
        with self._lock:
            manager = self.manager
            if manager is None and not self._hooks:  # never started (an app used without its lifespan)
                self._start()
                return
            if (manager is not None and manager.is_running()
                    and manager.background_thread_status.can_accept_new_requests() is None):
                return
            old, self.manager = self.manager, None
            if old is not None:
                try:
                    old.stop(block=True, timeout=30)
                except Exception:  # the old thread is gone; what matters is the new one
                    logger.exception("stopping the failed batching loop")
            self.restarts += 1
            logger.warning("restarting the batching loop after a failed step (restart %d)", self.restarts)
            self._start_manager()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.manager is not None:  # requests still in it fail ("generation loop finished"): nothing waits for them
            self.manager.stop(block=True, timeout=60, hard_stop=True)
            self.manager = None
        if self._attention is not None:
            self.model.set_attn_implementation(self._attention)
            self._attention = None

    # -- figures -------------------------------------------------------------------------------
    def _before_step(self, module, args, kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        ids = kwargs.get("input_ids")
        sequences = int(cu.numel()) - 1 if isinstance(cu, torch.Tensor) else 1
        tokens = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else 0
        self._step_shape = (sequences, tokens)
        self._step_scores = self._scoring > 0
        if self._step_scores:
            self._bounds = cu.tolist()
            self._positions = kwargs["position_ids"].reshape(-1).tolist()
        self._step_start = time.perf_counter()

    def _after_step(self, module, args, output):
        seconds = time.perf_counter() - self._step_start
        sequences, tokens = self._step_shape
        s = self.step_stats
        s.steps += 1
        s.sequences += sequences
        s.tokens += tokens
        s.seconds += seconds
        s.max_step_s = max(s.max_step_s, seconds)
        s.recent.append((sequences, tokens, seconds))
        if self.on_step is not None:
            self.on_step(sequences, tokens, seconds)

    # -- log-probabilities (on the batching thread, inside a step) ---------------------------------
    def _record(self, rid: str, entry: TokenLogprob) -> None:
        req = self.live.get(rid)
        if req is not None:
            req.logprobs.append(entry)

    def _score_prompts(self, module, args, output) -> None:
        """The decoder's hook: for each request in the step that scores its prompt, the log-probability of every
        prompt token this step's chunk predicts, from the decoder's last hidden states (all positions; the model's
        forward keeps only those that choose a token). Runs inside the step, on the batching thread: never a second
        forward."""
        if not self._step_scores:
            return
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]  # [1, T, D]
        lm_head = self.model.get_output_embeddings()
        for i, future in enumerate(self._requests_in_step()):
            req = self.live.get(future.state.request_id)
            if req is None or not req.params.prompt_logprobs:
                continue
            lo, hi = self._bounds[i], self._bounds[i + 1]
            for index, entry in score_prompt(hidden[0, lo:hi], self._positions[lo:hi], req.prompt_ids, lm_head,
                                             req.params.logprobs):
                req.prompt_logprobs[index] = entry

    def _requests_in_step(self) -> list:
        """The step's requests in the order of its sequences (transformers' own record of the batch)."""
        processor = getattr(self.manager, "batch_processor", None)
        requests = getattr(getattr(processor, "inputs_and_outputs", None), "requests_in_batch", None)
        if requests is None or len(requests) != len(self._bounds) - 1:
            raise RuntimeError("this transformers version's continuous batching does not record the requests of a "
                               "step as moeshard expects: install the transformers version pyproject.toml names")
        return requests

    @property
    def active(self) -> int:
        """Sequences in the batch now (prefilling or decoding)."""
        manager = self.manager
        processor = getattr(manager, "batch_processor", None) if manager is not None else None
        return len(processor.scheduler.active_requests) if processor is not None else 0

    @property
    def queued(self) -> int:
        """Requests admitted and waiting for a place in the batch."""
        return max(0, len(self.live) - self.active)

    @property
    def full(self) -> bool:
        return len(self.live) + self._held >= self.capacity

    @property
    def capacity(self) -> int:
        """Requests the batch and its queue hold together."""
        return self.cfg.max_batch + self.cfg.max_queue

    def hold(self) -> Place:
        """A place in the batch or its queue, held from now until `generate` takes it or it is released: a server
        answers 200 only once its request holds one (on the event loop). Raises `Overloaded` when none is left."""
        return self.hold_many(1)[0]

    def hold_many(self, count: int) -> list[Place]:
        """`count` places at once (a request with several prompts or choices), or none: `Overloaded`."""
        if count > self.capacity:
            raise ValueError(f"{count} places asked for; the batch and its queue hold {self.capacity}")
        if len(self.live) + self._held + count > self.capacity:
            raise Overloaded(self.full_message(), self.retry_after_s())
        self._held += count
        return [Place(self) for _ in range(count)]

    def full_message(self) -> str:
        return (f"the server is at capacity ({self.cfg.max_batch} sequences in the batch and {self.cfg.max_queue} "
                "waiting, --max-batch/--max-queue): retry later")

    def retry_after_s(self) -> int:
        typical = sorted(self._durations)[len(self._durations) // 2] if self._durations else 5.0
        return max(1, math.ceil(typical * (1 + self.queued / self.cfg.max_batch)))

    # -- requests ------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       on_text: Callable[[str], None] | None = None,
                       on_first_token: Callable[[], None] | None = None,
                       interrupt: threading.Event | None = None, place: Place | None = None,
                       on_logprobs: Callable[[list[TokenLogprob | None], bool], None] | None = None
                       ) -> GenerationResult:
        """Decode one request in the shared batch: `on_text` gets its text as it is decoded, `on_first_token` is
        called when its first token exists, `on_logprobs(entries, of_prompt)` gets the log-probabilities asked for
        (`params.logprobs`): the prompt's once (with `params.prompt_logprobs`), then each new token's before its
        text. Cancelling the awaiting task takes the request out of the batch at the next step; setting `interrupt`
        does too, and returns what was decoded (finish "stop"). Raises `Overloaded` when the batch and queue are
        full (unless `place`, from `hold`, is given), `GenerationFailed` when a step it was in failed."""
        held = place is not None and place.take()
        if not prompt_ids:
            raise ValueError("the prompt is empty: expected at least one token")
        context = self.engine.context_length
        if context and len(prompt_ids) + params.max_new_tokens > context:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                             f"the model's context length of {context} tokens")
        if not held and self.full:
            raise Overloaded(self.full_message(), self.retry_after_s())
        constraint = None
        if params.grammar is not None:  # off the event loop: a large schema takes a while to build
            constraint = await asyncio.to_thread(self.grammars.start, params.grammar)
        loop = asyncio.get_running_loop()
        rid = f"r-{uuid.uuid4().hex}"
        req = _Request(rid, list(prompt_ids), params, _TextOut(self.engine.tokenizer, on_text,
                                                               params.skip_special_tokens),
                       loop.create_future(), time.perf_counter(), on_first_token, interrupt, on_logprobs)
        self.live[rid] = req
        if constraint is not None:
            self.grammars.active[rid] = constraint
        self._scoring += int(params.prompt_logprobs)
        try:
            self._submit(req)
            await req.done
            return self._result(req)
        finally:
            # however it ends (finished, failed, stopped or the caller cancelled): out of the batch, forgotten
            self.live.pop(rid, None)
            self.grammars.active.pop(rid, None)
            self._scoring -= int(params.prompt_logprobs)
            if req.finish in (None, "stop-string", "interrupted"):
                self._cancel(rid)
            self._durations.append(time.perf_counter() - req.submitted)

    def _submit(self, req: _Request) -> None:
        p = req.params
        if p.temperature > 0:  # without a seed, one drawn here: every token is chosen by `ChooseToken`
            seed = p.seed if p.seed is not None else random.getrandbits(31)
            kwargs = dict(temperature=float(p.temperature), top_p=float(p.top_p), choose=seed & 0x7FFFFFFF)
        else:
            kwargs = dict(temperature=1.0, top_p=1.0, choose=GREEDY)
        kwargs["logprobs"] = p.logprobs if p.logprobs is not None else NO_LOGPROBS
        if p.logit_bias:
            kwargs["logit_bias"] = tuple(zip(*p.logit_bias))  # ((token ids), (biases))
        for attempt in range(2):
            self._ensure_running()
            manager = self.manager
            manager.register_result_handler(req.rid, lambda output, r=req: self._on_output(r, output))
            # a prompt only scored still prefills to its end, where the manager chooses one token: it is dropped
            if manager.add_request(req.prompt_ids, request_id=req.rid, max_new_tokens=max(1, p.max_new_tokens),
                                   streaming=True, **kwargs) is not None:
                return
            self._forget(manager, req.rid)  # refused: the loop stopped between the check and the request
        raise GenerationFailed("the batching loop is not accepting requests")

    def _on_output(self, req: _Request, output) -> None:
        """On the event loop: a step's tokens for one request (all its tokens so far)."""
        if req.done.done():
            return
        now = time.perf_counter()
        new = output.generated_tokens[len(req.token_ids):]
        if new and not req.token_ids:
            if req.params.prompt_logprobs:
                if len(req.prompt_logprobs) < len(req.prompt_ids) - 1:  # a prefill chunk was not scored
                    req.done.set_exception(GenerationFailed("the prompt's log-probabilities are incomplete"))
                    return
                if req.on_logprobs is not None:
                    req.on_logprobs(self._prompt_logprobs(req), True)
            if req.params.max_new_tokens == 0:  # scored: the prompt's end reached, the token chosen there dropped
                req.finish = "scored"
                new = []
            elif req.on_first_token is not None:
                req.on_first_token()
        if new and req.on_logprobs is not None and req.params.logprobs is not None:
            req.on_logprobs(req.logprobs[len(req.token_ids):len(req.token_ids) + len(new)], False)
        for token in new:
            req.token_ids.append(token)
            req.token_times.append(now)
            if token not in self.eos_ids:
                req.out.put(torch.tensor([token]))
            if req.params.stop and self._stopped(req):
                req.finish = "stop-string"
                break
            if req.interrupt is not None and req.interrupt.is_set():
                req.finish = "interrupted"
                break
        if req.finish is None and output.is_finished():
            if output.status == RequestStatus.FAILED:
                req.done.set_exception(GenerationFailed(f"generation failed: {output.error}"))
                return
            req.finish = "stop" if req.token_ids and req.token_ids[-1] in self.eos_ids else "length"
        if req.finish is not None:
            req.out.end()
            req.done.set_result(None)

    def _stopped(self, req: _Request) -> bool:
        text = self._text(req)
        return any(s in text for s in req.params.stop)

    def _text(self, req: _Request) -> str:
        if req.params.skip_special_tokens:
            return self.engine.tokenizer.decode(req.token_ids, skip_special_tokens=True)
        # special tokens kept (tool-call markers), but not the EOS that ended the sequence, as the stream shows it
        return self.engine.tokenizer.decode([t for t in req.token_ids if t not in self.eos_ids])

    @staticmethod
    def _prompt_logprobs(req: _Request) -> list[TokenLogprob | None]:
        return [None] + [req.prompt_logprobs[i] for i in range(1, len(req.prompt_ids))]

    def _result(self, req: _Request) -> GenerationResult:
        text = self._text(req)
        finish = "length" if req.finish in ("length", "scored") else "stop"
        if req.params.stop:
            cut = min((i for i in (text.find(s) for s in req.params.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        times = req.token_times
        first = times[0] - req.submitted if times else None
        decode_s = times[-1] - times[0] if len(times) > 1 else 0.0
        stats = {"prompt_tokens": len(req.prompt_ids), "cached_tokens": req.cached_tokens,
                 "new_tokens": len(req.token_ids),
                 "wall_s": (times[-1] if times else time.perf_counter()) - req.submitted, "ttft_s": first,
                 "decode_tok_s": (len(times) - 1) / decode_s if decode_s > 0 else None}
        logprobs = req.logprobs[:len(req.token_ids)] if req.params.logprobs is not None else None
        prompt = self._prompt_logprobs(req) if req.params.prompt_logprobs else None
        return GenerationResult(text, list(req.token_ids), len(req.prompt_ids), finish, stats, list(times), logprobs,
                                prompt)

    def _cancel(self, rid: str) -> None:
        manager = self.manager
        if manager is not None:
            manager.cancel_request(rid)
            self._forget(manager, rid)

    @staticmethod
    def _forget(manager, rid: str) -> None:
        """Drops the request's result handler (transformers drops it only when a request finishes, not when it is
        cancelled)."""
        router = manager.output_router
        with router._lock:
            router.result_handlers.pop(rid, None)

    async def generate_many(self, prompts: list[list[int]], params: SamplingParams,
                            on_done: Callable[[int, GenerationResult], None] | None = None) -> list[GenerationResult]:
        """Several prompts as one batch (offline jobs): more than `max_batch` wait for a place (the queue must hold
        them); `on_done(i, result)` in prompt order, each as soon as it and every earlier one have finished."""
        finished: dict[int, GenerationResult] = {}
        reported = 0

        async def one(i: int, ids: list[int]) -> GenerationResult:
            nonlocal reported
            result = finished[i] = await self.generate(ids, params)
            while on_done is not None and reported in finished:
                on_done(reported, finished[reported])
                reported += 1
            return result

        return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts))))
