"""Reading a worker's request messages within bounds: `MessageGuard` reads every message itself, so that none is
held or parsed beyond what the worker can afford (a byte budget for the messages held at once, each method's own
largest message), and `MessageBudget` counts those bytes. It maps nothing else and knows no model: the servicer
says, per method, how large a message may be.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError

SERVICE = "moeshard.v1.ExpertService"
RUN = f"/{SERVICE}/RunExperts"
SESSION = f"/{SERVICE}/Session"
PUSH = f"/{SERVICE}/PushExperts"
_PARSE_OFF_LOOP_BYTES = 1 << 20  # messages above this are parsed on a thread, not on the event loop


class RequestLimits(Protocol):
    errors: int  # refused calls, counted with the servicer's own refusals

    def request_limit(self, method: str) -> tuple[int, str] | None:
        """The largest message `method` can need, and why; None: only gRPC's own limit."""


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 1 << 20 else f"{n / 2**10:.1f} KiB"


class MessageBudget:
    """Bytes of request messages held at once. Touched on the event loop only."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, nbytes: int) -> bool:
        if self.held + nbytes > self.limit:
            return False
        self.held += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.held -= nbytes

    def busy(self) -> str:
        return (f"worker busy: {_size(self.held)} of requests are being read or handled, and another could take up "
                f"to the limit of {_size(self.limit)}: retry shortly")


class MessageGuard(grpc.aio.ServerInterceptor):
    """Reads request messages itself. A unary call of the ExpertService first reserves, from `budget`, the largest
    message gRPC may buffer for it (gRPC reads a message only once asked for it, so a call refused for want of room
    cost nothing), waits for its message at most `timeout_s`, keeps only the message's own size reserved until it
    ends, and is refused before parsing when its message is larger than the servicer says that method can need.
    The messages of the Session and PushExperts streams are checked the same way as they come, each large one
    held within the budget while it is handled. Large messages are parsed on a thread; bytes that are not the
    expected message get INVALID_ARGUMENT with a message instead of gRPC's UNKNOWN."""

    def __init__(self, timeout_s: float, servicer: RequestLimits, budget: MessageBudget, max_message: int):
        self.timeout_s, self.servicer, self.budget = timeout_s, servicer, budget
        self.reserve = min(max_message, budget.limit)  # what gRPC may buffer for one message
        # One thread for large parses: a pool would grow a malloc arena per thread it happens to start.
        self._parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeshard-parse")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return self._unary(handler, method)
        if method in (SESSION, PUSH):
            return self._stream(handler, method)
        return handler

    async def _parse(self, parse, raw: bytes):
        """(the message, None), or (None, why) for bytes that are not one."""
        try:
            if len(raw) > _PARSE_OFF_LOOP_BYTES:
                return await asyncio.get_running_loop().run_in_executor(self._parser, parse, raw), None
            return parse(raw), None
        except DecodeError as exc:
            return None, str(exc)

    def _oversized(self, method: str, nbytes: int) -> str | None:
        """Why a message of `nbytes` is refused unparsed: larger than the method can need; None if it is not."""
        limit = self.servicer.request_limit(method)
        if limit is None or nbytes <= limit[0]:
            return None
        self.servicer.errors += 1
        name = method.rsplit("/", 1)[-1]
        return f"{name} message of {_size(nbytes)}: expected at most {_size(limit[0])} ({limit[1]})"

    def _unary(self, handler, method: str):
        parse, inner, budget = handler.request_deserializer, handler.unary_unary, self.budget
        gated = method.startswith(f"/{SERVICE}/")  # health is never refused for want of room

        async def guarded(request_iterator, context):
            held = self.reserve if gated else 0
            if held and not budget.take(held):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, budget.busy())
            try:
                try:
                    raw = await asyncio.wait_for(context.read(), timeout=self.timeout_s)
                except asyncio.TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"the request message did not arrive within {self.timeout_s:.0f} s")
                if raw is grpc.aio.EOF:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the call carried no request message")
                if held:
                    budget.give(held - len(raw))
                    held = len(raw)
                refusal = self._oversized(method, len(raw))
                if refusal is not None:
                    del raw  # not kept alive by the abort's traceback
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
                request, malformed = await self._parse(parse, raw)
                del raw
                if malformed is not None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"malformed request for {method}: {malformed}")
                return await inner(request, context)
            finally:
                budget.give(held)

        return grpc.stream_unary_rpc_method_handler(guarded, request_deserializer=None,
                                                    response_serializer=handler.response_serializer)

    def _stream(self, handler, method: str):
        parse, budget = handler.request_deserializer, self.budget

        async def messages(raw_messages, context):
            held = 0
            try:
                async for raw in raw_messages:
                    budget.give(held)  # the message before this one has been handled
                    held = 0
                    refusal = self._oversized(method, len(raw))
                    if refusal is not None:
                        del raw
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
                    if len(raw) > _PARSE_OFF_LOOP_BYTES:
                        if not budget.take(len(raw)):
                            del raw
                            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, budget.busy())
                        held = len(raw)
                    message, malformed = await self._parse(parse, raw)
                    del raw
                    if malformed is not None:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            f"malformed request for {method}: {malformed}")
                    yield message
            finally:
                budget.give(held)

        if handler.stream_stream is not None:
            inner = handler.stream_stream

            async def guarded_stream(request_iterator, context):
                async for reply in inner(messages(request_iterator, context), context):
                    yield reply

            return grpc.stream_stream_rpc_method_handler(guarded_stream, request_deserializer=None,
                                                         response_serializer=handler.response_serializer)
        inner = handler.stream_unary

        async def guarded(request_iterator, context):
            return await inner(messages(request_iterator, context), context)

        return grpc.stream_unary_rpc_method_handler(guarded, request_deserializer=None,
                                                    response_serializer=handler.response_serializer)
