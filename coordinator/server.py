"""`moe-coordinator serve`: an OpenAI-compatible HTTP API over one `Engine`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with and without
`stream: true`, as server-sent events), GET /health, GET /metrics. Generations run one at a time on a
worker thread (the engine's lock), so concurrent requests queue and never share a KV cache; a client
that disconnects mid-stream stops its generation. Errors use OpenAI's JSON error shape.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .engine import Engine, GenerationResult, SamplingParams
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


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


class OpenAIService:
    """The handlers of the OpenAI-compatible API over one `Engine` (registered by `create_app`)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.metrics = ServerMetrics(engine)
        self.created = int(time.time())

    # -- helpers ------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.engine.name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {self.engine.name!r}",
                           "invalid_request_error", "model", "model_not_found")

    @staticmethod
    def params_for(req: _Sampling, max_tokens: int | None) -> SamplingParams:
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: expected up to 4 non-empty strings", param="stop")
        return SamplingParams(max_new_tokens=max_tokens or 16, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop=stop)

    def check_context(self, prompt_ids: list[int], params: SamplingParams) -> None:
        limit = self.engine.context_length
        if limit and len(prompt_ids) + params.max_new_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the request asks for "
                                f"{len(prompt_ids)} prompt tokens + {params.max_new_tokens} max_tokens",
                           param="max_tokens", code="context_length_exceeded")

    @staticmethod
    def usage(result: GenerationResult) -> dict:
        n = len(result.token_ids)
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}

    async def run(self, prompt_ids, params, endpoint: str, on_text=None, cancel=None) -> GenerationResult:
        start = time.perf_counter()
        try:
            result = await asyncio.to_thread(self.engine.generate, prompt_ids, params, on_text, cancel)
        except Exception:
            self.metrics.requests.labels(endpoint, "error").inc()
            raise
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        self.metrics.requests.labels(endpoint, "ok").inc()
        self.metrics.tokens.inc(len(result.token_ids))
        self.metrics.prompt_tokens.inc(result.prompt_tokens)
        return result

    def stream(self, prompt_ids, params, endpoint: str, make_chunk, final_chunk) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        stop_filter = _StopFilter(params.stop)

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("text", text))

        async def produce():
            try:
                result = await self.run(prompt_ids, params, endpoint, on_text, cancel)
                await queue.put(("done", result))
            except Exception as exc:  # reported to the client in-stream; the server keeps serving
                logger.exception("streaming generation failed")
                await queue.put(("error", exc))

        async def events():
            task = asyncio.create_task(produce())
            try:
                while True:
                    kind, value = await queue.get()
                    if kind == "text":
                        text = stop_filter.push(value)
                        if text:
                            yield f"data: {json.dumps(make_chunk(text))}\n\n"
                    elif kind == "done":
                        tail = stop_filter.flush()
                        if tail:
                            yield f"data: {json.dumps(make_chunk(tail))}\n\n"
                        yield f"data: {json.dumps(final_chunk(value))}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        body = {"error": {"message": str(value), "type": "server_error", "param": None, "code": None}}
                        yield f"data: {json.dumps(body)}\n\n"
                        return
            finally:
                cancel.set()  # a client that went away stops its generation
                await task

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- endpoints ----------------------------------------------------------------------------
    async def models(self):
        return {"object": "list", "data": [{"id": self.engine.name, "object": "model", "created": self.created,
                                            "owned_by": "moeshard"}]}

    async def health(self):
        workers = list(self.engine.cluster.workers) if self.engine.cluster is not None else []
        return {"status": "ok", "model": self.engine.name, "workers": workers}

    async def metrics_endpoint(self):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, req: CompletionRequest, request: Request):
        self.check_model(req.model)
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise APIError(400, "prompt: expected one string (batches of prompts are not supported)", param="prompt")
            prompt = req.prompt[0]
        else:
            prompt = req.prompt
        params = self.params_for(req, req.max_tokens)
        prompt_ids = self.engine.encode_prompt(prompt)
        self.check_context(prompt_ids, params)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": self.engine.name}
        if req.stream:
            return self.stream(prompt_ids, params, "completions",
                               lambda text: {**base, "choices": [{"text": text, "index": 0, "logprobs": None,
                                                                   "finish_reason": None}]},
                               lambda r: {**base, "choices": [{"text": "", "index": 0, "logprobs": None,
                                                               "finish_reason": r.finish_reason}], "usage": self.usage(r)})
        result = await self.run(prompt_ids, params, "completions")
        return {**base, "choices": [{"text": result.text, "index": 0, "logprobs": None,
                                     "finish_reason": result.finish_reason}], "usage": self.usage(result)}

    async def chat_completions(self, req: ChatCompletionRequest, request: Request):
        self.check_model(req.model)
        params = self.params_for(req, req.max_completion_tokens or req.max_tokens)
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in req.messages]
        prompt_ids = self.engine.encode_chat(messages)
        self.check_context(prompt_ids, params)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": self.engine.name}
        if req.stream:
            first = [True]

            def chunk(text):
                delta = {"role": "assistant", "content": text} if first[0] else {"content": text}
                first[0] = False
                return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

            return self.stream(prompt_ids, params, "chat", chunk,
                               lambda r: {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": r.finish_reason}],
                                          "usage": self.usage(r)})
        result = await self.run(prompt_ids, params, "chat")
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}], "usage": self.usage(result)}


async def _api_error(request, exc: APIError):
    return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code)


async def _validation_error(request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return _error_response(400, f"request body is not valid JSON: {first.get('msg', '')}", "invalid_request_error")
    param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
    return _error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", "invalid_request_error",
                           param)


async def _value_error(request, exc: ValueError):
    return _error_response(400, str(exc), "invalid_request_error")


async def _http_error(request, exc: StarletteHTTPException):
    return _error_response(exc.status_code, str(exc.detail), "invalid_request_error")


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="moeshard", version=__version__)
    service = OpenAIService(engine)
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
    return app


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
