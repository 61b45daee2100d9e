"""`moe-coordinator serve`: an OpenAI-compatible HTTP API over one `Engine`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with and without
`stream: true`, as server-sent events), GET /health, GET /metrics. Requests are decoded together by
continuous batching (`batching.Batcher`: each joins the batch at the next step and leaves when it ends);
beyond the batch and its queue a request gets 429 with Retry-After. A client that goes away, streaming or
not, takes its request out of the batch at the next step. Prompts are tokenized on a thread, after a
length check, so the event loop never waits on one. A parameter this server does not implement is refused with a
400 naming it, never ignored. Errors use OpenAI's JSON error shape. The door (API key, body limits,
timeouts, connection cap) is `http_security`'s.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .batching import BatchConfig, Batcher, Overloaded, Place
from .engine import Engine, GenerationResult, SamplingParams
from .http_security import (PROMPT_CHARS_PER_TOKEN, GuardedH11Protocol, HttpGuard, ServeConfig, error_body,
                            log_unexpected)
from .metrics import ServerMetrics
from .request_body import LIST_LIMITS, BodyError, BodyParser

logger = logging.getLogger(__name__)

GREEDY_BELOW = 1e-5  # smaller temperatures decode greedily (their limit): dividing logits by 5e-324 gives inf/NaN
MAX_STOP_CHARS = 256  # per stop string: transformers' stop-string tables grow with vocabulary size x length


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                    headers: dict | None = None):
    return Response(error_body(message, type_, param, code), status, media_type="application/json", headers=headers)


def _valid_unicode(value):
    """A string, or strings, that UTF-8 can encode: JSON's "\\ud800" decodes to a lone surrogate, which no
    tokenizer takes."""
    for text in [value] if isinstance(value, str) else (value or ()):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PydanticCustomError("invalid_unicode", "contains a lone UTF-16 surrogate at character {position}; "
                                      "expected valid Unicode text", {"position": exc.start}) from None
    return value


def _message_text(content: Any) -> str:
    """A message's content as text: a string, or a list of text parts; null is ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return _valid_unicode(content)
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                                         and isinstance(p["text"], str) for p in content):
        return _valid_unicode("".join(p["text"] for p in content))
    raise PydanticCustomError("content_type", "expected a string or a list of {part} parts (this server takes text "
                              "only)", {"part": '{"type": "text", "text": "..."}'})


def _only(accepted: str, *values):
    """A parameter this server does not implement: accepted only with a value that asks for nothing (OpenAI's
    default), refused otherwise with a message naming it."""

    def check(value):
        if not any(value == v and type(value) is type(v) for v in values):
            raise PydanticCustomError("unsupported_value", "not supported by this server: remove it, or send "
                                      "{accepted}", {"accepted": accepted})
        return value

    return Annotated[Any, AfterValidator(check)]


_Zero = _only("null or 0", None, 0, 0.0)
_NoBias = _only("null or {}", None, {})


class _Request(BaseModel):
    # an unknown parameter is refused, never silently ignored; types are JSON's own ("12" is not a number, "yes"
    # not a boolean; an integer is a number)
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False  # a last chunk with the usage and no choices, as OpenAI sends it


class _Sampling(_Request):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None  # the caller's end-user id, for its own records: nothing here depends on it
    presence_penalty: _Zero = None
    frequency_penalty: _Zero = None
    logit_bias: _NoBias = None

    @field_validator("model", "stop", "user")
    @classmethod
    def _unicode(cls, value):
        return _valid_unicode(value)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False  # the reply's text starts with the prompt
    best_of: _only("null or 1", None, 1) = None
    logprobs: _only("null", None) = None
    suffix: _only('null or ""', None, "") = None

    @field_validator("prompt")
    @classmethod
    def _unicode_prompt(cls, value):
        return _valid_unicode(value)


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[Any, AfterValidator(_message_text)] = ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: _only("null or false", None, False) = None
    top_logprobs: _only("null or 0", None, 0) = None
    response_format: _only('null or {"type": "text"}', None, {"type": "text"}) = None
    tools: _only("null or []", None, []) = None
    tool_choice: _only('null or "none"', None, "none") = None


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

    def _on_step(self, sequences: int, tokens: int, seconds: float) -> None:  # on the batching thread
        self.metrics.batch_size.observe(sequences)
        self.metrics.step_tokens.observe(tokens)
        self.metrics.step_seconds.observe(seconds)
        self.metrics.queue_depth.observe(self.batcher.queued)

    # -- helpers ------------------------------------------------------------------------------
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

    def check_model(self, name: str) -> None:
        if name != self.engine.name:
            raise APIError(404, f"the model {name[:100]!r} does not exist: this server serves {self.engine.name!r}",
                           "invalid_request_error", "model", "model_not_found")

    def params_for(self, req: _Sampling, max_tokens: int | None) -> SamplingParams:
        if max_tokens is not None and self.max_tokens is not None and max_tokens > self.max_tokens:
            raise APIError(400, f"max_tokens: {max_tokens} is more than this server allows per request "
                                f"({self.max_tokens}, --max-tokens)", param="max_tokens")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options: only allowed with stream: true", param="stream_options")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > LIST_LIMITS["stop"] or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise APIError(400, f"stop: expected up to {LIST_LIMITS['stop']} non-empty strings of at most "
                                f"{MAX_STOP_CHARS} characters", param="stop")
        temperature = req.temperature if req.temperature >= GREEDY_BELOW else 0.0
        return SamplingParams(max_new_tokens=max_tokens or 16, temperature=temperature, top_p=req.top_p,
                              seed=req.seed, stop=stop)

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
    def usage(result: GenerationResult) -> dict:
        n = len(result.token_ids)
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}

    def finished(self, endpoint: str, outcome: str, result: GenerationResult | None = None) -> None:
        """Counts a request that reached the batcher, by outcome: ok, cancelled (its client went away) or error."""
        self.metrics.requests.labels(endpoint, outcome).inc()
        if result is not None:
            self.metrics.tokens.inc(len(result.token_ids))
            self.metrics.prompt_tokens.inc(result.prompt_tokens)
            stats = result.stats
            if stats.get("ttft_s") is not None:
                self.metrics.ttft.observe(stats["ttft_s"])
            if stats.get("decode_tok_s") is not None:
                self.metrics.stream_tok_s.observe(stats["decode_tok_s"])

    def admit(self, endpoint: str) -> Place:
        """Before a reply starts: a place in the batch or its queue, held for this request; 429 with Retry-After
        while none is left. A stream is answered 200 only once it holds its place."""
        try:
            return self.batcher.hold()
        except Overloaded as exc:
            self.metrics.requests.labels(endpoint, "rejected").inc()
            self.metrics.rejections.labels("overloaded").inc()
            raise APIError(429, str(exc), "server_overloaded", code="server_overloaded",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None

    async def generate(self, prompt_ids, params, endpoint: str, place: Place, on_text=None,
                       on_first_token=None) -> GenerationResult:
        """One request through the batch in its held `place`, counted by outcome. Cancelling the calling task (its
        client went away) takes it out of the batch at the next step."""
        start = time.perf_counter()
        try:
            result = await self.batcher.generate(prompt_ids, params, on_text, on_first_token, place=place)
        except asyncio.CancelledError:
            self.finished(endpoint, "cancelled")
            raise
        except Exception:
            self.finished(endpoint, "error")
            raise
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        self.finished(endpoint, "ok", result)
        return result

    async def run(self, request: Request, prompt_ids, params, endpoint: str, place: Place) -> GenerationResult:
        """A non-streaming request: generated while its connection is watched; if the client disconnects first,
        its generation is cancelled (and nothing is sent)."""
        task = asyncio.ensure_future(self.generate(prompt_ids, params, endpoint, place))
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            place.release()  # if the task never started
            watcher.cancel()
            if not task.done():  # the client left (or this handler was cancelled): the request leaves the batch
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise APIError(499, "the client closed the connection before the reply", "client_closed")
        return task.result()

    def stream(self, prompt_ids, params, endpoint: str, place: Place, *, base: dict, make_chunk, final_chunk,
               include_usage: bool, prefix: str = "", first_chunk=None) -> StreamingResponse:
        """Server-sent events: `prefix` (an echoed prompt), `first_chunk` (chat: the assistant's role, as soon as the
        first token exists), the text as it comes, the final chunk, then the usage: alone in a chunk with no
        choices when `include_usage` (OpenAI's form), else on the final chunk."""
        queue: asyncio.Queue = asyncio.Queue()
        stop_filter = _StopFilter(params.stop)

        async def produce():
            try:
                result = await self.generate(prompt_ids, params, endpoint, place,
                                             lambda text: queue.put_nowait(("text", text)),
                                             lambda: queue.put_nowait(("first",)))
                queue.put_nowait(("done", result))
            except Exception as exc:  # reported to the client in-stream; the server keeps serving
                log_unexpected(logger, f"streaming {endpoint}", exc)
                queue.put_nowait(("error", str(exc), "server_error"))

        async def events():
            task = asyncio.ensure_future(produce())
            try:
                if prefix:
                    yield _sse(make_chunk(prefix))
                while True:
                    kind, *value = await queue.get()
                    if kind == "first":
                        if first_chunk is not None:
                            yield _sse(first_chunk())
                    elif kind == "text":
                        text = stop_filter.push(value[0])
                        if text:
                            yield _sse(make_chunk(text))
                    elif kind == "done":
                        result = value[0]
                        tail = stop_filter.flush()
                        if tail:
                            yield _sse(make_chunk(tail))
                        if include_usage:
                            yield _sse(final_chunk(result))
                            yield _sse({**base, "choices": [], "usage": self.usage(result)})
                        else:
                            yield _sse({**final_chunk(result), "usage": self.usage(result)})
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        yield _sse({"error": {"message": value[0], "type": value[1], "param": None, "code": None}})
                        return
            finally:
                if not task.done():  # the client went away: its request leaves the batch at the next step
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                place.release()  # if the task never started

        # the background task runs even when the client left before the stream began
        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(place.release))

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

    async def completions(self, request: Request):
        req = await self.parse(request, CompletionRequest)
        self.check_model(req.model)
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise APIError(400, "prompt: expected one string (batches of prompts are not supported)", param="prompt")
            prompt = req.prompt[0]
        else:
            prompt = req.prompt
        self.check_prompt_size(len(prompt), "prompt")
        params = self.params_for(req, req.max_tokens)
        prompt_ids = await asyncio.to_thread(self.engine.encode_prompt, prompt)
        self.check_context(prompt_ids, params, "prompt")
        place = self.admit("completions")
        echo = prompt if req.echo else ""
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": self.engine.name}
        if req.stream:
            return self.stream(prompt_ids, params, "completions", place, base=base, prefix=echo,
                               include_usage=req.include_usage,
                               make_chunk=lambda text: {**base, "choices": [{"text": text, "index": 0, "logprobs": None,
                                                                             "finish_reason": None}]},
                               final_chunk=lambda r: {**base, "choices": [{"text": "", "index": 0, "logprobs": None,
                                                                           "finish_reason": r.finish_reason}]})
        result = await self.run(request, prompt_ids, params, "completions", place)
        return {**base, "choices": [{"text": echo + result.text, "index": 0, "logprobs": None,
                                     "finish_reason": result.finish_reason}], "usage": self.usage(result)}

    async def chat_completions(self, request: Request):
        req = await self.parse(request, ChatCompletionRequest)
        self.check_model(req.model)
        params = self.params_for(req, req.max_completion_tokens or req.max_tokens)
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        self.check_prompt_size(sum(len(m["content"]) for m in messages), "messages")
        try:
            prompt_ids = await asyncio.to_thread(self.engine.encode_chat, messages)
        except TemplateError as exc:  # e.g. roles that do not alternate as the template requires
            raise APIError(400, f"messages: the model's chat template refused them: {exc}", param="messages") from None
        self.check_context(prompt_ids, params, "messages")
        place = self.admit("chat")
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": self.engine.name}
        if req.stream:
            def chunk(text):
                return {**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}

            def role():  # OpenAI's first chunk: the role, no text yet
                return {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]}

            return self.stream(prompt_ids, params, "chat", place, base=base, make_chunk=chunk,
                               include_usage=req.include_usage, first_chunk=role,
                               final_chunk=lambda r: {**base, "choices": [{"index": 0, "delta": {},
                                                                           "finish_reason": r.finish_reason}]})
        result = await self.run(request, prompt_ids, params, "chat", place)
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}], "usage": self.usage(result)}


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
