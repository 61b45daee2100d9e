"""Shared-token authentication for the worker: a server interceptor that checks every RPC, health included.

The token travels as `authorization: Bearer <token>` metadata (over TLS when the worker has a
certificate) and is compared in constant time. A call without the right token is refused with
UNAUTHENTICATED before any handler runs, so no work is done for it.
"""
from __future__ import annotations

import hmac
import logging

import grpc

from ..protos.wire import AUTH_METADATA_KEY, bearer

logger = logging.getLogger(__name__)


def _refuse(message: str):
    async def handler(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return handler


class TokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        if not token:
            raise ValueError("the shared token must not be empty")
        self._expected = bearer(token).encode()

    async def intercept_service(self, continuation, handler_call_details):
        presented = dict(handler_call_details.invocation_metadata or ()).get(AUTH_METADATA_KEY, "")
        if isinstance(presented, str):
            presented = presented.encode()
        if hmac.compare_digest(presented, self._expected):
            return await continuation(handler_call_details)
        logger.warning("refused %s: %s token", handler_call_details.method, "wrong" if presented else "missing")
        handler = await continuation(handler_call_details)
        message = "missing or wrong token: start the coordinator with the worker's --token (or MOESHARD_TOKEN)"
        # The refusal never parses the request (request_deserializer=None) and answers unknown methods the
        # same way, so nothing about the service is learnt without the token.
        if handler is not None and (handler.request_streaming or handler.response_streaming):
            async def stream_refusal(request, context):  # health Watch is server-streaming
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                yield  # pragma: no cover - makes this an async generator
            return grpc.unary_stream_rpc_method_handler(stream_refusal, request_deserializer=None,
                                                        response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(_refuse(message), request_deserializer=None,
                                                   response_serializer=None if handler is None
                                                   else handler.response_serializer)
