"""Shared-token authentication for the worker: a server interceptor that checks every RPC, health included.

The token travels as `authorization: Bearer <token>` metadata (over TLS when the worker has a
certificate) and is compared in constant time. A call without the right token is refused with
UNAUTHENTICATED as soon as its headers arrive: its message is never read, decompressed or parsed, it
holds no call slot, and no handler runs. Refusals are logged at most once per `LOG_EVERY_S`, with the
method name quoted and cut short, so a client without the token cannot write the log either.
"""
from __future__ import annotations

import hmac
import logging
import threading
import time

import grpc

from ..protos.wire import AUTH_METADATA_KEY, bearer, quote

logger = logging.getLogger(__name__)

LOG_EVERY_S = 10.0  # at most one refusal line per this many seconds
MESSAGE = "missing or wrong token: start the coordinator with the worker's --token (or MOESHARD_TOKEN)"


async def _refuse(request_iterator, context):
    # A stream handler: the request is never read, so an unauthenticated client's bytes are never buffered
    # into a message, decompressed or parsed.
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)


async def _refuse_stream(request_iterator, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)
    yield  # pragma: no cover - makes this an async generator (server-streaming methods, e.g. health Watch)


_REFUSE_UNARY = grpc.stream_unary_rpc_method_handler(_refuse)
_REFUSE_STREAM = grpc.stream_stream_rpc_method_handler(_refuse_stream)
_STREAMING = ("/grpc.health.v1.Health/Watch", "/moeshard.v1.ExpertService/Session")  # server-streaming methods


class RefusalLog:
    """One warning per period for refused calls, with a count of those not logged in between."""

    def __init__(self, every_s: float = LOG_EVERY_S):
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last = -float("inf")
        self._suppressed = 0

    def refused(self, method: str, presented: bool) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.every_s:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        logger.warning("refused a call to %s: %s token%s", quote(method, 64), "wrong" if presented else "missing",
                       f" ({suppressed} more refusals not logged in the last {self.every_s:.0f} s)" if suppressed else "")


class TokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        if not token:
            raise ValueError("the shared token must not be empty")
        self._expected = bearer(token).encode()
        self.log = RefusalLog()

    async def intercept_service(self, continuation, handler_call_details):
        presented = dict(handler_call_details.invocation_metadata or ()).get(AUTH_METADATA_KEY, "")
        if isinstance(presented, str):
            presented = presented.encode()
        if hmac.compare_digest(presented, self._expected):
            return await continuation(handler_call_details)
        self.log.refused(handler_call_details.method, bool(presented))
        # Unknown methods are answered the same way: nothing about the service is learnt without the token.
        return _REFUSE_STREAM if handler_call_details.method in _STREAMING else _REFUSE_UNARY
