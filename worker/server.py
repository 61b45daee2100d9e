"""The gRPC side of `moe-worker`: a thin `ExpertService` servicer around an `ExpertShard`, plus health.

Each RPC validates its request, runs the shard's work on one compute thread (the event loop never
blocks), and maps exceptions to status codes in one place. Health is NOT_SERVING until the shard is
loaded and SERVING after; on shutdown it goes NOT_SERVING, in-flight requests finish, then the server stops.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..offload_core.experts import ExpertKey
from ..protos import expert_pb2 as pb
from ..protos import expert_pb2_grpc as pb_grpc
from ..protos.wire import WireError, tensor_from_pb, tensor_to_pb

from .. import __version__
from .auth import TokenInterceptor
from .shard import ExpertShard, FingerprintMismatch, OverCapacity, ShardConfig, UnknownExpert

logger = logging.getLogger(__name__)

VERSION = __version__

SERVICE = "moeshard.v1.ExpertService"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"  # loopback unless told otherwise; port 0 picks a free port (tests)
    grace_s: float = 5.0  # drain time for in-flight requests after SIGTERM
    max_concurrent_rpcs: int = 64  # more are refused with RESOURCE_EXHAUSTED by gRPC itself
    token: str | None = None  # shared secret every RPC must carry; required off loopback
    tls_cert: bytes | None = None  # PEM certificate chain; with tls_key, the worker speaks TLS only
    tls_key: bytes | None = None

    def __post_init__(self):
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"listen address {self.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
        if not is_loopback(host) and not self.token:
            raise ValueError(f"listening on {host} (not loopback) needs a shared token: pass --token or set "
                             "MOESHARD_TOKEN (and preferably --tls-cert/--tls-key)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _status_for(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, FingerprintMismatch):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, UnknownExpert):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, (OverCapacity, MemoryError, torch.OutOfMemoryError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (ValueError, WireError)):  # before any text matching: messages echo client input
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():  # allocator errors without a type
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


class ParseGuard(grpc.aio.ServerInterceptor):
    """Parses unary requests itself, so bytes that are not the expected message get INVALID_ARGUMENT with a
    message instead of grpc's UNKNOWN."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse, inner = handler.request_deserializer, handler.unary_unary

        async def guarded(raw: bytes, context):
            try:
                request = parse(raw)
            except DecodeError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"malformed request for {handler_call_details.method}: {exc}")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded, request_deserializer=None,
                                                   response_serializer=handler.response_serializer)


def _rpc(method):
    """Run the handler; map a failure to one status code with a message, log the unexpected ones."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        if self.shard is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is still loading its checkpoint")
        try:
            return await method(self, request, context)
        except Exception as exc:  # every failure becomes a status; the worker keeps serving
            code = _status_for(exc)
            self.shard.counters["errors"] += 1
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("%s failed", method.__name__)
            else:
                logger.debug("%s refused: %s", method.__name__, exc)
            await context.abort(code, str(exc))

    return wrapper


class ExpertServicer(pb_grpc.ExpertServiceServicer):
    def __init__(self):
        self.shard: ExpertShard | None = None
        # One compute thread: the shard's caches are driven by one request at a time, in arrival order.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeshard-compute")

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._compute, functools.partial(fn, *args))

    @_rpc
    async def Info(self, request, context):
        return self.shard.info(VERSION).to_pb()

    @_rpc
    async def Assign(self, request, context):
        self.shard.check_fingerprint(request.fingerprint)
        keys = [ExpertKey(e.layer, e.expert) for e in request.experts]
        hosted = await self._call(self.shard.assign, keys)
        return pb.AssignResponse(hosted=[pb.ExpertId(layer=k.layer, expert=k.expert) for k in sorted(hosted)])

    @_rpc
    async def RunExperts(self, request, context):
        s = self.shard
        s.check_fingerprint(request.fingerprint)
        hidden = tensor_from_pb(request.hidden, max_elements=s.cfg.max_tokens * s.layout.hidden_size, name="hidden")
        hint = (request.prefetch_layer, list(request.prefetch_experts)) if request.prefetch_experts else None
        output, hits, misses = await self._call(s.run, request.layer, list(request.experts), list(request.counts),
                                                hidden, hint)
        return pb.RunExpertsResponse(output=tensor_to_pb(output), hits=hits, misses=misses)

    @_rpc
    async def Prefetch(self, request, context):
        self.shard.check_fingerprint(request.fingerprint)
        issued = await self._call(self.shard.prefetch, request.layer, list(request.experts))
        return pb.PrefetchResponse(issued=issued)

    @_rpc
    async def Stats(self, request, context):
        return self.shard.stats().to_pb()

    def close(self) -> None:
        self._compute.shutdown(wait=True)
        if self.shard is not None:
            self.shard.close()


class WorkerServer:
    """Lifecycle: `start()` listens (NOT_SERVING), `load()` opens the shard (SERVING), `stop()` drains."""

    def __init__(self, shard_cfg: ShardConfig, server_cfg: ServerConfig = ServerConfig(),
                 max_receive_bytes: int = 64 << 20):
        self.shard_cfg, self.server_cfg = shard_cfg, server_cfg
        self.max_receive_bytes = max_receive_bytes
        self.servicer = ExpertServicer()
        self.address: str | None = None

    async def start(self) -> str:
        # grpc.aio objects belong to the event loop they are created on: build them here, not in __init__.
        self.health = health.aio.HealthServicer()
        options = [("grpc.max_receive_message_length", self.max_receive_bytes),
                   ("grpc.max_send_message_length", self.max_receive_bytes)]
        cfg = self.server_cfg
        interceptors = [TokenInterceptor(cfg.token)] if cfg.token else []
        interceptors.append(ParseGuard())
        self.server = grpc.aio.server(options=options, maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
                                      interceptors=interceptors)
        pb_grpc.add_ExpertServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        host = cfg.listen.rsplit(":", 1)[0]
        if cfg.tls_cert is not None:
            creds = grpc.ssl_server_credentials([(cfg.tls_key, cfg.tls_cert)])
            port = self.server.add_secure_port(cfg.listen, creds)
        else:
            port = self.server.add_insecure_port(cfg.listen)
        if port == 0:
            raise OSError(f"could not listen on {self.server_cfg.listen}: is the port in use?")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self.address = f"{host}:{port}"
        logger.info("listening on %s (NOT_SERVING until the checkpoint is loaded)", self.address)
        return self.address

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        self.servicer.shard = await loop.run_in_executor(None, ExpertShard, self.shard_cfg)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("SERVING %s (fingerprint %s) on %s", self.shard_cfg.model, self.servicer.shard.fingerprint,
                    self.servicer.shard.device)

    async def _set_health(self, status) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking new work, let in-flight requests finish (up to the grace period), then stop."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.server_cfg.grace_s if grace_s is None else grace_s)
        self.servicer.close()
        logger.info("stopped")

    async def wait(self) -> None:
        await self.server.wait_for_termination()
