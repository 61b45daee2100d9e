"""A plain gRPC byte sink, the baseline for weight pushes: a client-streaming call of raw chunks that the
server only counts. Run as its own process (like a worker), it prints its port on stdout once listening."""
from __future__ import annotations

import asyncio
import sys

import grpc

METHOD = "/moeshard.bench.Sink/Push"


async def _push(request_iterator, context) -> bytes:
    received = 0
    async for chunk in request_iterator:
        received += len(chunk)
    return received.to_bytes(8, "little")


async def _serve() -> None:
    # The worker's own flow-control settings, so that the baseline differs from a push only by what a push adds.
    server = grpc.aio.server(options=[("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 64 << 20)])
    handler = grpc.method_handlers_generic_handler("moeshard.bench.Sink", {
        "Push": grpc.stream_unary_rpc_method_handler(_push)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def send(address: str, total: int, chunk: int = 1 << 20) -> int:
    """Stream `total` bytes in `chunk`s to the sink at `address`; returns what it counted."""
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
    payload = bytes(chunk)

    def chunks():
        sent = 0
        while sent < total:
            piece = payload[: min(chunk, total - sent)]
            sent += len(piece)
            yield piece

    push = channel.stream_unary(METHOD, request_serializer=None, response_deserializer=None)
    try:
        return int.from_bytes(push(chunks(), timeout=3600), "little")
    finally:
        channel.close()


if __name__ == "__main__":
    asyncio.run(_serve())
    sys.exit(0)
