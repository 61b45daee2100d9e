"""`moe-coordinator serve`: an OpenAI-compatible HTTP API over one `Engine`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with and without `stream: true`, as
server-sent events), vLLM's POST /tokenize, POST /detokenize and GET /tokenizer_info, GET /health, GET /metrics.
Requests are decoded together by continuous batching (`batching.Batcher`: each sequence joins the batch at the next
step and leaves when it ends); a request with several prompts or `n` choices holds one place per sequence, all of
them or none, and beyond the batch and its queue gets 429 with Retry-After. A client that goes away, streaming or
not, takes its sequences out of the batch at the next step. Prompts are tokenized on a thread, after a length
check, so the event loop never waits on one. Bodies and the shapes of log-probabilities are `openai_api`'s (a
parameter this server does not implement is refused with a 400 naming it); errors use OpenAI's JSON error shape.
Chat's `tools` go through the model's chat template and its calls are read back by `tools`; `response_format` and
forced calls constrain decoding with a grammar (`grammar`).
The door (API key, body limits, timeouts, connection cap) is `http_security`'s.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .batching import BatchConfig, Batcher, Overloaded, Place
from .engine import Engine
from .sampling import GenerationResult, SamplingParams, TokenLogprob
from .http_security import (PROMPT_CHARS_PER_TOKEN, GuardedH11Protocol, HttpGuard, ServeConfig, error_body,
                            log_unexpected)
from .metrics import ServerMetrics
from .grammar import GrammarError
from .openai_api import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, LegacyLogprobs, NamedToolChoice,
                         TokenizeRequest, TokenTexts, chat_logprobs)
from . import tools as tool_calls
from .request_body import LIST_LIMITS, BodyError, BodyParser

logger = logging.getLogger(__name__)

GREEDY_BELOW = 1e-5  # smaller temperatures decode greedily (their limit): dividing logits by 5e-324 gives inf/NaN
MAX_STOP_CHARS = 256  # per stop string: transformers' stop-string tables grow with vocabulary size x length
DEFAULT_MAX_TOKENS = 16  # when a request names no max_tokens (OpenAI's completions default)
_TOKENIZER_LOADING = frozenset({"vocab_file", "merges_file", "tokenizer_file", "name_or_path", "is_local",
                                "local_files_only"})  # how this server found its tokenizer, not what it is


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                    headers: dict | None = None):
    return Response(error_body(message, type_, param, code), status, media_type="application/json", headers=headers)


class _StopFilter:
    """Holds back the tail of a stream that could still turn into a stop string, so none leaks out."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.keep = stops, max((len(s) for s in stops), default=1) - 1
        self.buffer, self.stopped = "", False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buffer += text
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buffer, self.stopped = self.buffer[:cut], "", True
            return out
        if self.keep <= 0:
            out, self.buffer = self.buffer, ""
            return out
        out, self.buffer = self.buffer[:-self.keep], self.buffer[-self.keep:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def _sse(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


@dataclass
class _Choice:
    """One sequence of a request: the index of its choice in the reply, its prompt, its place in the batch."""
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    place: Place
    echo: str = ""  # completions with echo: the prompt's text, which the choice's text starts with
    prompt: int = 0  # which of the request's prompts it continues


def _choices(prompts: list[list[int]], params: SamplingParams, n: int, places: list[Place],
             echoes: list[str]) -> list[_Choice]:
    """n choices per prompt, choice j of prompt i at index i * n + j (OpenAI's order); with a seed, choice j samples
    with seed + j, so that the choices differ and each is repeatable."""
    out = []
    for i, (ids, echo) in enumerate(zip(prompts, echoes)):
        for j in range(n):
            seeded = params if params.seed is None else dataclasses.replace(params, seed=params.seed + j)
            out.append(_Choice(i * n + j, ids, seeded, places[len(out)], echo, i))
    return out


class _Stream:
    """A streamed request's events, from the batch's callbacks to the response's generator (both on the event
    loop): ("first" | "text" | "logprobs" | "done", choice, ...) or ("error", message)."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    def callbacks(self, choice: _Choice) -> dict:
        put = self.queue.put_nowait
        return dict(on_text=lambda text: put(("text", choice, text)), on_first_token=lambda: put(("first", choice)),
                    on_logprobs=lambda entries, of_prompt: put(("logprobs", choice, entries, of_prompt)))

    def done(self, choice: _Choice, result: GenerationResult) -> None:
        self.queue.put_nowait(("done", choice, result))


class OpenAIService:
    """The handlers of the OpenAI-compatible API over one `Engine` (registered by `create_app`)."""

    def __init__(self, engine: Engine, cfg: ServeConfig, batch: BatchConfig = BatchConfig(),
                 max_tokens: int | None = None):
        self.engine = engine
        self.batcher = Batcher(engine, batch, on_step=self._on_step)
        self.metrics = ServerMetrics(engine, self.batcher)
        self.created = int(time.time())
        self.max_prompt_chars = cfg.prompt_char_limit(engine.context_length)
        self.max_tokens = max_tokens  # the most a request may ask for (--max-tokens); None: the context
        self.bodies = BodyParser()
        self.texts = TokenTexts(engine.tokenizer)
        self._tokenizer_info: dict | None = None

    def _on_step(self, sequences: int, tokens: int, seconds: float) -> None:  # on the batching thread
        self.metrics.batch_size.observe(sequences)
        self.metrics.step_tokens.observe(tokens)
        self.metrics.step_seconds.observe(seconds)
        self.metrics.queue_depth.observe(self.batcher.queued)

    # -- checks -------------------------------------------------------------------------------
    async def parse(self, request: Request, model: type[BaseModel]):
        """The request's body as `model`: parsed and its lists counted (`request_body`, a large body in another
        process), then validated."""
        try:
            data = await self.bodies.load(await request.body())
        except BodyError as exc:
            raise APIError(400, exc.message, param=exc.param) from None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.engine.name:
            raise APIError(404, f"the model {name[:100]!r} does not exist: this server serves {self.engine.name!r}",
                           "invalid_request_error", "model", "model_not_found")

    def check_tokens(self, ids: list[int], param: str) -> list[int]:
        """Token ids the model has: 0 <= id < its vocabulary."""
        vocab = self.engine.vocab_size
        for k, token in enumerate(ids):
            if not 0 <= token < vocab:
                raise APIError(400, f"{param}: token id {token} (at {k}) is not in the model's vocabulary: expected "
                                    f"0 <= id < {vocab}", param=param)
        return ids

    def check_choices(self, prompts: int, n: int) -> int:
        """The sequences a request asks for (prompts x n): at most what the batch and its queue hold together."""
        count, capacity = prompts * n, self.batcher.capacity
        if count > capacity:
            raise APIError(400, f"{'n' if n > 1 else 'prompt'}: {prompts} prompt(s) x n={n} is {count} sequences, "
                                f"more than this server's batch and queue hold together ({capacity}, --max-batch + "
                                "--max-queue)", param="n" if n > 1 else "prompt")
        return count

    def params_for(self, req, max_tokens: int | None, logprobs: int | None = None,
                   prompt_logprobs: bool = False) -> SamplingParams:
        if max_tokens is not None and self.max_tokens is not None and max_tokens > self.max_tokens:
            raise APIError(400, f"max_tokens: {max_tokens} is more than this server allows per request "
                                f"({self.max_tokens}, --max-tokens)", param="max_tokens")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options: only allowed with stream: true", param="stream_options")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > LIST_LIMITS["stop"] or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise APIError(400, f"stop: expected up to {LIST_LIMITS['stop']} non-empty strings of at most "
                                f"{MAX_STOP_CHARS} characters", param="stop")
        bias = tuple((int(token), value) for token, value in (req.logit_bias or {}).items())
        vocab = self.engine.vocab_size
        for token, _ in bias:
            if token >= vocab:
                raise APIError(400, f"logit_bias: token id {token} is not in the model's vocabulary: expected "
                                    f"0 <= id < {vocab}", param="logit_bias")
        temperature = req.temperature if req.temperature >= GREEDY_BELOW else 0.0
        return SamplingParams(max_new_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
                              temperature=temperature, top_p=req.top_p, seed=req.seed, stop=stop, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, logit_bias=bias)

    def check_prompt_size(self, chars: int, param: str) -> None:
        """Before tokenizing: a prompt far longer than the context could ever hold is refused unread."""
        limit = self.max_prompt_chars
        if limit is not None and chars > limit:
            raise APIError(400, f"{param}: {chars} characters, more than this server's limit of {limit} "
                                f"(--max-prompt-chars; by default {PROMPT_CHARS_PER_TOKEN} per token of the model's "
                                f"{self.engine.context_length}-token context)", param=param,
                           code="context_length_exceeded")

    def check_context(self, prompt_ids: list[int], params: SamplingParams, param: str) -> None:
        if not prompt_ids:
            raise APIError(400, f"{param}: empty: expected text that makes at least one token", param=param)
        limit = self.engine.context_length
        if limit and len(prompt_ids) + params.max_new_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the request asks for "
                                f"{len(prompt_ids)} prompt tokens + {params.max_new_tokens} max_tokens",
                           param="max_tokens", code="context_length_exceeded")

    @staticmethod
    def usage(prompt_tokens: int, done: list[tuple[_Choice, GenerationResult]]) -> dict:
        """OpenAI's usage. A prompt counts once however many choices continue it, and so do its cached tokens: those
        that none of its choices computed (reused from the prefix cache by every one)."""
        n = sum(len(r.token_ids) for _, r in done)
        cached: dict[int, int] = {}
        for choice, result in done:
            reused = result.stats.get("cached_tokens", 0)
            cached[choice.prompt] = min(cached.get(choice.prompt, reused), reused)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}

    # -- generation ---------------------------------------------------------------------------
    def finished(self, endpoint: str, outcome: str, results: list[GenerationResult] = ()) -> None:
        """Counts a request that reached the batcher once, by outcome: ok, cancelled (its client went away) or
        error; and its sequences' tokens and timings."""
        self.metrics.requests.labels(endpoint, outcome).inc()
        for result in results:
            self.metrics.tokens.inc(len(result.token_ids))
            self.metrics.prompt_tokens.inc(result.prompt_tokens)
            stats = result.stats
            if stats.get("ttft_s") is not None:
                self.metrics.ttft.observe(stats["ttft_s"])
            if stats.get("decode_tok_s") is not None:
                self.metrics.stream_tok_s.observe(stats["decode_tok_s"])

    def admit(self, endpoint: str, count: int) -> list[Place]:
        """Before a reply starts: a place in the batch or its queue for each of the request's sequences, held for
        them; 429 with Retry-After while there are not that many left. A stream is answered 200 only once it holds
        its places."""
        try:
            return self.batcher.hold_many(count)
        except Overloaded as exc:
            self.metrics.requests.labels(endpoint, "rejected").inc()
            self.metrics.rejections.labels("overloaded").inc()
            raise APIError(429, str(exc), "server_overloaded", code="server_overloaded",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None

    async def generate(self, choices: list[_Choice], endpoint: str, stream: _Stream | None = None
                       ) -> list[GenerationResult]:
        """Every choice through the batch in its held place, together. Cancelling the calling task (its client went
        away), or one choice failing, takes them all out of the batch at the next step. The request is counted
        once, by outcome, by the choice that decides it, in the step its sequence leaves the batch: before a
        reply (or the stream's last event) can be sent."""
        results: dict[int, GenerationResult] = {}
        start, counted = time.perf_counter(), False

        def count(outcome: str) -> None:
            nonlocal counted
            if not counted:
                counted = True
                if outcome == "ok":
                    self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
                self.finished(endpoint, outcome, list(results.values()) if outcome == "ok" else [])

        async def one(choice: _Choice) -> GenerationResult:
            callbacks = stream.callbacks(choice) if stream is not None else {}
            try:
                result = await self.batcher.generate(choice.prompt_ids, choice.params, place=choice.place,
                                                     **callbacks)
            except asyncio.CancelledError:
                count("cancelled")
                raise
            except Exception:
                count("error")
                raise
            results[choice.index] = result
            if len(results) == len(choices):
                count("ok")
            if stream is not None:
                stream.done(choice, result)
            return result

        tasks = [asyncio.ensure_future(one(c)) for c in choices]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:  # cancelled, or one choice failed: the others leave the batch too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def run(self, request: Request, choices: list[_Choice], endpoint: str) -> list[GenerationResult]:
        """A non-streaming request: generated while its connection is watched; if the client disconnects first,
        its generation is cancelled (and nothing is sent)."""
        task = asyncio.ensure_future(self.generate(choices, endpoint))
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for choice in choices:
                choice.place.release()  # if its generation never started
            watcher.cancel()
            if not task.done():  # the client left (or this handler was cancelled): the request leaves the batch
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise APIError(499, "the client closed the connection before the reply", "client_closed")
        return task.result()

    def stream(self, choices: list[_Choice], endpoint: str, *, base: dict, prompt_tokens: int,
               make_chunk: Callable[..., dict | None], final_chunk: Callable[[_Choice, GenerationResult], dict],
               include_usage: bool, first_chunk: Callable[[_Choice], dict] | None = None) -> StreamingResponse:
        """Server-sent events, per choice: its echoed prompt (at once, or with the prompt's log-probabilities once
        they exist), `first_chunk` (chat: the assistant's role, as soon as the first token exists), the text as it
        comes with the log-probabilities of the tokens decoded since the last chunk (`make_chunk(choice, text,
        entries, of_prompt)`; None: nothing to send yet), its final chunk; then the usage: alone in a chunk with no
        choices when `include_usage` (OpenAI's form), else on the last final chunk."""
        events = _Stream()
        stop_filters = {c.index: _StopFilter(c.params.stop) for c in choices}
        pending: dict[int, list[TokenLogprob]] = {c.index: [] for c in choices}  # log-probabilities not yet sent

        def take(choice: _Choice) -> list[TokenLogprob] | None:
            entries, pending[choice.index] = pending[choice.index], []
            return entries if choice.params.logprobs is not None else None

        async def produce():
            try:
                await self.generate(choices, endpoint, events)
            except Exception as exc:  # reported to the client in-stream; the server keeps serving
                log_unexpected(logger, f"streaming {endpoint}", exc)
                events.queue.put_nowait(("error", str(exc)))

        async def chunks():
            task = asyncio.ensure_future(produce())
            finished: list[tuple[_Choice, GenerationResult]] = []
            ended = False  # every choice finished, or failed: the producer ends by itself
            try:
                for choice in choices:
                    if choice.echo and not choice.params.prompt_logprobs:
                        yield _sse(make_chunk(choice, choice.echo, None))
                while True:
                    kind, *value = await events.queue.get()
                    if kind == "first":
                        if first_chunk is not None:
                            yield _sse(first_chunk(value[0]))
                    elif kind == "logprobs":
                        choice, entries, of_prompt = value
                        if of_prompt:
                            yield _sse(make_chunk(choice, choice.echo, entries, True))
                        else:
                            pending[choice.index].extend(entries)
                    elif kind == "text":
                        choice, text = value
                        text = stop_filters[choice.index].push(text)
                        if text and (chunk := make_chunk(choice, text, take(choice))) is not None:
                            yield _sse(chunk)
                    elif kind == "done":
                        choice, result = value
                        tail = stop_filters[choice.index].flush()
                        if (tail or pending[choice.index]) and (chunk := make_chunk(choice, tail, take(choice))):
                            yield _sse(chunk)
                        finished.append((choice, result))
                        if len(finished) < len(choices):
                            yield _sse(final_chunk(choice, result))
                            continue
                        ended = True
                        usage = self.usage(prompt_tokens, finished)
                        if include_usage:
                            yield _sse(final_chunk(choice, result))
                            yield _sse({**base, "choices": [], "usage": usage})
                        else:
                            yield _sse({**final_chunk(choice, result), "usage": usage})
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        ended = True
                        yield _sse({"error": {"message": value[0], "type": "server_error", "param": None,
                                              "code": None}})
                        return
            finally:
                if not ended:  # the client went away: its sequences leave the batch at the next step
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                for choice in choices:
                    choice.place.release()  # if its generation never started

        async def release():  # runs even when the client left before the stream began
            for choice in choices:
                choice.place.release()

        return StreamingResponse(chunks(), media_type="text/event-stream", background=BackgroundTask(release))

    # -- endpoints ----------------------------------------------------------------------------
    async def models(self):
        return {"object": "list", "data": [{"id": self.engine.name, "object": "model", "created": self.created,
                                            "owned_by": "moeshard"}]}

    async def health(self, request: Request):
        """"ok", or "degraded" while a worker is not serving (its experts computed elsewhere, or failing the steps
        that need them); with the key, each worker's state (serving / down / receiving / joining) since when."""
        cluster = self.engine.cluster
        status = "degraded" if cluster is not None and cluster.degraded else "ok"
        if not request.state.authorized:  # without the key: that the server is up, and nothing about it
            return {"status": status}
        workers = {}
        if cluster is not None:
            for name, d in cluster.describe().items():
                workers[name] = {"state": d["state"], "since": d["since"], "detail": d["detail"],
                                 "failures": d["failures"], "hosted_experts": d["hosted"],
                                 "pushed_bytes": d["pushed_bytes"]}
        return {"status": status, "model": self.engine.name, "workers": workers}

    async def metrics_endpoint(self):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _encode_prompts(self, texts: list[str]) -> list[list[int]]:
        return [self.engine.encode_prompt(text) for text in texts]

    def _legacy_logprobs(self, choice: _Choice, result: GenerationResult) -> dict:
        """A whole choice's legacy log-probabilities: with echo, the prompt's (from 0 in the text), then the new
        tokens' (from the end of the echoed prompt)."""
        legacy = LegacyLogprobs(self.texts)
        if not choice.params.prompt_logprobs:
            return legacy.piece(result.token_ids, result.logprobs)
        prompt = legacy.piece(choice.prompt_ids, result.prompt_logprobs)
        legacy.offset = len(choice.echo)
        new = legacy.piece(result.token_ids, result.logprobs)
        return {key: prompt[key] + new[key] for key in prompt}

    async def completions(self, request: Request):
        req = await self.parse(request, CompletionRequest)
        self.check_model(req.model)
        prompts: list[str | list[int]] = req.prompt
        count = self.check_choices(len(prompts), req.n)
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: 0 generates nothing: expected at least 1, or 0 with echo: true (the "
                                "prompt scored, with logprobs)", param="max_tokens")
        report = req.logprobs is not None
        # max_tokens 0 prefills the prompt and stops there, scoring it (reported only with logprobs)
        scored = req.echo and (report or max_tokens == 0)
        params = self.params_for(req, max_tokens, req.logprobs if report else (0 if scored else None), scored)
        texts = [p for p in prompts if isinstance(p, str)]
        for text in texts:
            self.check_prompt_size(len(text), "prompt")
        encoded = iter(await asyncio.to_thread(self._encode_prompts, texts) if texts else ())
        prompt_ids = [next(encoded) if isinstance(p, str) else self.check_tokens(p, "prompt") for p in prompts]
        for ids in prompt_ids:
            self.check_context(ids, params, "prompt")
        echoes = [""] * len(prompts)
        if req.echo:  # a prompt of token ids is echoed as its text
            decode = functools.partial(self.engine.tokenizer.decode, skip_special_tokens=True)
            echoes = await asyncio.to_thread(lambda: [p if isinstance(p, str) else decode(p) for p in prompts])
        choices = _choices(prompt_ids, params, req.n, self.admit("completions", count), echoes)
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": self.engine.name}
        if req.stream:
            legacy = {c.index: LegacyLogprobs(self.texts) for c in choices}

            def chunk(choice: _Choice, text: str, entries: list | None, of_prompt: bool = False) -> dict:
                logprobs = None
                if report and entries is not None:
                    ids = choice.prompt_ids if of_prompt else [e.token for e in entries]
                    logprobs = legacy[choice.index].piece(ids, entries)
                    if of_prompt:
                        legacy[choice.index].offset = len(choice.echo)
                return {**base, "choices": [{"text": text, "index": choice.index, "logprobs": logprobs,
                                             "finish_reason": None}]}

            return self.stream(choices, "completions", base=base, prompt_tokens=prompt_tokens, make_chunk=chunk,
                               include_usage=req.include_usage,
                               final_chunk=lambda c, r: {**base, "choices": [{"text": "", "index": c.index,
                                                                              "logprobs": None,
                                                                              "finish_reason": r.finish_reason}]})
        results = await self.run(request, choices, "completions")
        logprobs = [None] * len(choices)
        if report:  # many tokens' texts: off the event loop
            logprobs = await asyncio.to_thread(lambda: [self._legacy_logprobs(c, r) for c, r in zip(choices, results)])
        return {**base, "choices": [{"text": c.echo + r.text, "index": c.index, "logprobs": lp,
                                     "finish_reason": r.finish_reason} for c, r, lp in zip(choices, results, logprobs)],
                "usage": self.usage(prompt_tokens, list(zip(choices, results)))}

    async def chat_completions(self, request: Request):
        req = await self.parse(request, ChatCompletionRequest)
        self.check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        report = bool(req.logprobs)
        count = self.check_choices(1, req.n)
        params = self.params_for(req, req.max_completion_tokens or req.max_tokens,
                                 (req.top_logprobs or 0) if report else None)
        tool_defs = [t.for_template() for t in req.tools or ()]
        messages = [m.for_template() for m in req.messages]
        self.check_prompt_size(sum(len(m["content"]) for m in messages) + len(json.dumps(tool_defs)), "messages")
        tools, grammar = await self.chat_constraints(req, tool_defs)
        if tools is not None or grammar is not None:  # calls are read from the text with its special tokens
            params = dataclasses.replace(params, grammar=grammar, skip_special_tokens=tools is None)
        try:
            if tool_defs:
                prompt_ids = await asyncio.to_thread(tool_calls.encode, self.engine.tokenizer, messages, tool_defs)
            else:
                prompt_ids = await asyncio.to_thread(self.engine.encode_chat, messages)
        except TemplateError as exc:  # e.g. roles that do not alternate as the template requires
            raise APIError(400, f"messages: the model's chat template refused them: {exc}", param="messages") from None
        self.check_context(prompt_ids, params, "messages")
        choices = _choices([prompt_ids], params, req.n, self.admit("chat", count), [""])
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": self.engine.name}
        parsers = {c.index: tools.parser() for c in choices} if tools is not None else {}
        if req.stream:
            def chunk(choice: _Choice, text: str, entries: list | None, of_prompt: bool = False) -> dict | None:
                logprobs = chat_logprobs(entries, self.texts) if report and entries is not None else None
                delta = {"content": text}
                if parsers:  # text that may be a call is held until it is settled
                    delta = tool_calls.delta(*parsers[choice.index].push(text))
                    if not delta and logprobs is None:
                        return None
                return {**base, "choices": [{"index": choice.index, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": None}]}

            def final(choice: _Choice, result: GenerationResult) -> dict:
                delta, finish = {}, result.finish_reason
                if parsers:
                    parser = parsers[choice.index]
                    delta = tool_calls.delta(*parser.finish())
                    finish = tool_calls.finish_reason(bool(parser.calls), finish)
                return {**base, "choices": [{"index": choice.index, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}]}

            def role(choice: _Choice) -> dict:  # OpenAI's first chunk: the role, no text yet
                return {**base, "choices": [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}

            return self.stream(choices, "chat", base=base, prompt_tokens=len(prompt_ids), make_chunk=chunk,
                               include_usage=req.include_usage, first_chunk=role, final_chunk=final)
        results = await self.run(request, choices, "chat")
        logprobs = [None] * len(choices)
        if report:
            logprobs = await asyncio.to_thread(lambda: [chat_logprobs(r.logprobs, self.texts) for r in results])
        replies = [tool_calls.reply(parsers[c.index], r.text, r.finish_reason) if parsers else
                   ({"role": "assistant", "content": r.text}, r.finish_reason) for c, r in zip(choices, results)]
        return {**base, "object": "chat.completion",
                "choices": [{"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish}
                            for c, (message, finish), lp in zip(choices, replies, logprobs)],
                "usage": self.usage(len(prompt_ids), list(zip(choices, results)))}

    async def chat_constraints(self, req: ChatCompletionRequest, tool_defs: list[dict]
                               ) -> tuple[tool_calls.ToolUse | None, str | None]:
        """What a chat request's tools and response_format ask of its decoding: the tool-call format to read calls
        back from the reply (`tools`), and the grammar its tokens must follow (a forced call, or JSON)."""
        named = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
        mode = None if named is not None else req.tool_choice
        form = req.response_format
        param = "tools"
        try:
            tools = tool_calls.ToolUse.of(tool_defs, mode, named, req.parallel_tool_calls,
                                          getattr(self.engine.tokenizer, "chat_template", None))
            if form is not None and form.type != "text":
                param = "response_format"
                if tools is not None:
                    raise APIError(400, 'response_format: not with tools (unless tool_choice is "none")', param=param)
                schema = form.json_schema.schema_ if form.json_schema is not None else None
                return None, await asyncio.to_thread(self.batcher.grammars.json_schema, schema)
            grammar = await asyncio.to_thread(tools.grammar, self.batcher.grammars) if tools is not None else None
        except tool_calls.ToolError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        except GrammarError as exc:
            raise APIError(400, f"{param}: {exc}", param=param) from None
        return tools, grammar

    # -- the tokenizer (vLLM's endpoints) -----------------------------------------------------
    async def tokenize(self, request: Request):
        """vLLM's /tokenize: a prompt as /v1/completions tokenizes it, or messages as /v1/chat/completions does."""
        req = await self.parse(request, TokenizeRequest)
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "expected either prompt (text) or messages (a chat), not both or neither",
                           param="prompt")
        if req.prompt is not None:
            self.check_prompt_size(len(req.prompt), "prompt")
            ids = await asyncio.to_thread(self.engine.encode_prompt, req.prompt, req.add_special_tokens is not False)
        else:
            if req.add_special_tokens:
                raise APIError(400, "add_special_tokens: messages are tokenized as chat completions tokenizes them "
                                    "(the chat template writes its special tokens): expected null or false",
                               param="add_special_tokens")
            messages = [m.for_template() for m in req.messages]
            self.check_prompt_size(sum(len(m["content"]) for m in messages), "messages")
            try:
                ids = await asyncio.to_thread(self.engine.encode_chat, messages, req.add_generation_prompt)
            except TemplateError as exc:
                raise APIError(400, f"messages: the model's chat template refused them: {exc}",
                               param="messages") from None
        strs = None
        if req.return_token_strs:
            strs = await asyncio.to_thread(self.engine.tokenizer.convert_ids_to_tokens, ids)
        return {"count": len(ids), "max_model_len": self.engine.context_length, "tokens": ids, "token_strs": strs}

    async def detokenize(self, request: Request):
        """vLLM's /detokenize: token ids to text, special tokens included."""
        req = await self.parse(request, DetokenizeRequest)
        self.check_model(req.model)
        self.check_tokens(req.tokens, "tokens")
        return {"prompt": await asyncio.to_thread(self.engine.tokenizer.decode, req.tokens)}

    async def tokenizer_info(self):
        """vLLM's /tokenizer_info: the tokenizer's settings (JSON-safe), its class and its chat template; how this
        server found its files is left out."""
        if self._tokenizer_info is None:
            tokenizer = self.engine.tokenizer
            info = {k: _json_safe(v) for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items()
                    if k not in _TOKENIZER_LOADING}
            info["tokenizer_class"] = type(tokenizer).__name__
            if getattr(tokenizer, "chat_template", None):
                info["chat_template"] = tokenizer.chat_template
            self._tokenizer_info = info
        return self._tokenizer_info


def _json_safe(value: Any) -> Any:
    """A tokenizer setting as JSON: an added token as its text, mappings and lists item by item, other objects as
    their text."""
    if hasattr(value, "content"):  # transformers' AddedToken
        return value.content
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the request body has been read: what uvicorn hands the
    app next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _count_rejection(request, reason: str) -> None:
    """A generation request refused for its content (a 4xx before any work): counted by endpoint and reason."""
    service = getattr(request.app.state, "service", None)
    endpoint = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(request.url.path)
    if service is not None and endpoint is not None:
        service.metrics.requests.labels(endpoint, "rejected").inc()
        service.metrics.rejections.labels(reason).inc()


async def _api_error(request, exc: APIError):
    if exc.status < 500 and exc.status not in (429, 499):  # 429 and 499 are counted where they happen
        _count_rejection(request, "invalid")
    return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


async def _validation_error(request, exc: RequestValidationError):
    _count_rejection(request, "invalid")
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return _error_response(400, f"request body is not valid JSON: {first.get('msg', '')}", "invalid_request_error")
    param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
    if first.get("type") == "extra_forbidden":
        message = f"{param}: unknown or unsupported parameter: this server does not implement it; remove it"
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    return _error_response(400, message, "invalid_request_error", param)


async def _value_error(request, exc: ValueError):
    _count_rejection(request, "invalid")
    return _error_response(400, str(exc), "invalid_request_error")


async def _http_error(request, exc: StarletteHTTPException):
    return _error_response(exc.status_code, str(exc.detail), "invalid_request_error")


def create_app(engine: Engine, cfg: ServeConfig = ServeConfig(), batch: BatchConfig = BatchConfig(),
               max_tokens: int | None = None) -> FastAPI:
    """The app; its lifespan starts the batching loop (and stops it, finishing nothing, at shutdown)."""
    service = OpenAIService(engine, cfg, batch, max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(service.batcher.start)
        try:
            yield
        finally:
            service.bodies.close()
            await asyncio.to_thread(service.batcher.close)

    app = FastAPI(title="moeshard", version=__version__, lifespan=lifespan)
    app.state.service = service
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValueError, _value_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_api_route("/v1/models", service.models, methods=["GET"])
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/metrics", service.metrics_endpoint, methods=["GET"])
    app.add_api_route("/v1/completions", service.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", service.chat_completions, methods=["POST"])
    app.add_api_route("/tokenize", service.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", service.detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", service.tokenizer_info, methods=["GET"])
    open_paths = frozenset({"/health", *(("/metrics",) if cfg.public_metrics else ())})
    app.add_middleware(HttpGuard, cfg=cfg, refusals=service.metrics.refusals, open_paths=open_paths,
                       known_paths=frozenset(route.path for route in app.routes))
    return app


def build_server(engine: Engine, cfg: ServeConfig, log_level: str = "info", batch: BatchConfig = BatchConfig(),
                 max_tokens: int | None = None) -> uvicorn.Server:
    """The uvicorn server `serve` runs: the app behind its guard, on h11 with a head deadline and a connection
    cap, HTTPS when `cfg` has a certificate."""
    app = create_app(engine, cfg, batch, max_tokens)
    config = uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level=log_level,
        # uvicorn calls any factory of protocols; the partial hands each connection its limits
        http=functools.partial(GuardedH11Protocol, limits=cfg, refusals=app.state.service.metrics.refusals),
        ws="none", access_log=False,  # HttpGuard logs each request without the path or headers the client wrote
        proxy_headers=False,  # the client address logged is the socket's, never a header the client chose
        ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key)
    return uvicorn.Server(config)
