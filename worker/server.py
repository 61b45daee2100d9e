"""The gRPC side of `moe-worker`: a thin `ExpertService` servicer around an `ExpertShard`, plus health.

Each RPC checks the sizes of what it was sent before touching its contents, runs the shard's work (decoding
included) on one compute thread so that the event loop, and with it health, never blocks, and maps exceptions
to status codes in one place. Messages are read by `MessageGuard`: with a deadline for the message itself, within
a budget of bytes held at once, refused before parsing when larger than the model can need, and parsed off the
event loop when large. At most `max_inflight` expert calls, `max_sessions` sessions and `max_pushes` pushes run at
once (more get RESOURCE_EXHAUSTED at once); health is outside those limits and answers under any load. Health is
NOT_SERVING until the shard is loaded and SERVING after; on shutdown it goes NOT_SERVING, in-flight requests
finish, then the server stops.
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .. import __version__
from ..offload_core.config import POLICIES, resolve_device
from ..offload_core.experts import ExpertKey
from ..protos import expert_pb2 as pb
from ..protos.access import is_loopback
from ..protos import expert_pb2_grpc as pb_grpc
from ..protos.wire import WireError, WorkerInfo, description_from_pb, quote, tensor_from_pb, tensor_to_pb
from .auth import TokenInterceptor
from .disk import FINGERPRINT, DiskBudget, DiskFull
from .messages import PUSH, RUN, SERVICE, SESSION, MessageBudget, MessageGuard
from .received import NotHeld, ReceiveError
from .shard import ExpertShard, FingerprintMismatch, OverCapacity, ShardConfig, UnknownExpert, free_memory

logger = logging.getLogger(__name__)

VERSION = __version__
_MAX_STATUS_CHARS = 512  # status messages stay far below gRPC's trailer limit, whatever a request held
_PUSH_QUEUE = 4  # pushed chunks (1 MiB each) read ahead of the one being written
_MAX_CHUNK_BYTES = 4 << 20  # one pushed chunk's message (a coordinator sends 1 MiB of expert bytes per chunk)
_MAX_JOIN = 1 << 20  # experts one Join may name before the model is known (then: every expert of every layer)


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"  # loopback unless told otherwise; port 0 picks a free port (tests)
    grace_s: float = 5.0  # drain time for in-flight requests after SIGTERM
    max_inflight: int = 64  # expert calls running or queued at once; more get RESOURCE_EXHAUSTED (health is exempt)
    message_timeout_s: float = 30.0  # a call whose request message has not arrived by then is refused
    token: str | None = None  # shared secret every RPC must carry; required off loopback
    tls_cert: bytes | None = None  # PEM certificate chain; with tls_key, the worker speaks TLS only
    tls_key: bytes | None = None
    keepalive_s: float = 60.0  # ping an idle connection this often, and drop it if the ping goes unanswered
    idle_s: float = 300.0  # close connections with no call for this long (a coordinator reconnects by itself)
    # Request bytes held at once (messages being read, parsed or computed): a unary call reserves the largest
    # message gRPC may buffer for it before its message is read; past the budget: RESOURCE_EXHAUSTED, at no cost.
    message_memory_bytes: int = 256 << 20
    max_sessions: int = 8  # Session streams open at once (one per coordinator); more get RESOURCE_EXHAUSTED
    max_pushes: int = 4  # PushExperts streams at once; more get RESOURCE_EXHAUSTED (the coordinator retries)

    def __post_init__(self):
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"listen address {self.listen!r}: expected HOST:PORT with a port in 1-65535 (0 picks a "
                             "free one), e.g. 127.0.0.1:50051")
        if not is_loopback(host) and not self.token:
            raise ValueError(f"listening on {host} (not loopback) needs a shared token: pass --token or set "
                             "MOESHARD_TOKEN (and preferably --tls-cert/--tls-key)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.max_inflight < 1 or self.message_timeout_s <= 0:
            raise ValueError("max_inflight must be >= 1 and message_timeout_s > 0")
        if self.max_sessions < 1 or self.max_pushes < 1 or self.message_memory_bytes < 1 << 20:
            raise ValueError("max_sessions and max_pushes must be >= 1 and message_memory_bytes >= 1 MiB")

    def grpc_options(self, max_receive_bytes: int) -> list[tuple[str, int]]:
        ms = lambda s: int(s * 1000)  # noqa: E731
        return [("grpc.max_receive_message_length", max_receive_bytes),
                ("grpc.max_send_message_length", max_receive_bytes),
                ("grpc.keepalive_time_ms", ms(self.keepalive_s)),
                ("grpc.keepalive_timeout_ms", ms(min(20.0, self.keepalive_s))),
                ("grpc.max_connection_idle_ms", ms(self.idle_s)),
                # Pings from a client more often than this, with no call, end the connection (ping floods).
                ("grpc.http2.min_ping_interval_without_data_ms", ms(10.0)),
                ("grpc.http2.max_ping_strikes", 2),
                # Flow-control windows stay at HTTP/2's 64 KiB per stream instead of growing with probes: what a
                # client can make the worker buffer before its call is refused stays small, and 64 KiB in flight
                # still fills a LAN's bandwidth-delay product.
                ("grpc.http2.bdp_probe", 0),
                ("grpc.so_reuseport", 0)]  # a second worker on a taken port fails instead of sharing its traffic


def _import_model_code() -> None:
    try:
        import transformers.generation  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
        from accelerate import init_empty_weights  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

        from ..offload_core import quant  # noqa: F401  (hqq)
    except Exception:  # only a head start: the Join imports them itself and reports what fails
        logger.debug("preloading imports failed", exc_info=True)


def _status_for(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, FingerprintMismatch):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, (UnknownExpert, NotHeld)):  # a damaged expert is a missing one: computed elsewhere, re-sent
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, (OverCapacity, DiskFull, MemoryError, torch.OutOfMemoryError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (ValueError, WireError, ReceiveError)):  # before any text matching: messages echo input
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():  # allocator errors without a type
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


def _message_for(exc: Exception) -> str:
    """The status message of a failure: its own text, cut short; an OSError's without the file names it carries
    (the worker's paths are its own business: the log has them)."""
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "this worker's disk is full: free some space, or give the worker another --cache-dir"
        return f"{exc.strerror or type(exc).__name__} on this worker's disk (the worker's log says where)"
    return _short(str(exc))


def _short(text: str) -> str:
    return text if len(text) <= _MAX_STATUS_CHARS else text[:_MAX_STATUS_CHARS] + "..."


def _rpc(method=None, *, needs_model: bool = True):
    """Run the handler inside the in-flight limit; map a failure to one status code with a short message, log
    the unexpected ones."""
    if method is None:
        return functools.partial(_rpc, needs_model=needs_model)

    @functools.wraps(method)
    async def wrapper(self, request, context):
        if self.shard is None and (needs_model or self.loading):
            await context.abort(*self._no_model())
        if self.inflight >= self.max_inflight:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"worker busy: {self.inflight} calls in flight (limit {self.max_inflight})")
        self.inflight += 1
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:  # refused already (by MessageGuard, reading a stream's message)
            raise
        except Exception as exc:  # every failure becomes a status; the worker keeps serving
            code = _status_for(exc)
            self.errors += 1
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("%s failed", method.__name__)
            else:
                logger.debug("%s refused: %s", method.__name__, _short(str(exc)))
            await context.abort(code, _message_for(exc))
        finally:
            self.inflight -= 1

    return wrapper


class ExpertServicer(pb_grpc.ExpertServiceServicer):
    def __init__(self, cfg: ShardConfig, server_cfg: ServerConfig = ServerConfig()):
        self.cfg = cfg
        self.shard: ExpertShard | None = None
        self.loading = cfg.model is not None  # until load(): a worker with --model reads its checkpoint first
        # Touched on the event loop only: calls, sessions and pushes under way, and their limits.
        self.inflight, self.max_inflight = 0, server_cfg.max_inflight
        self.sessions, self.max_sessions = 0, server_cfg.max_sessions
        self.pushes, self.max_pushes = 0, server_cfg.max_pushes
        self.errors = 0  # refused or failed calls, whoever held the model
        self.disk = DiskBudget(cfg.received_root, cfg.disk_bytes)  # every model's received experts, against --disk
        # One compute thread: the shard's caches are driven by one request at a time, in arrival order.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeshard-compute")

    def _no_model(self) -> tuple[grpc.StatusCode, str]:
        if self.loading:
            return grpc.StatusCode.UNAVAILABLE, "worker is still loading its checkpoint"
        return grpc.StatusCode.FAILED_PRECONDITION, "this worker holds no model yet: a coordinator must join it first"

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._compute, functools.partial(fn, *args))

    def request_limit(self, method: str) -> tuple[int, str] | None:
        """The largest message `method` can need, and why; None: only gRPC's own limit."""
        if method == PUSH:
            return _MAX_CHUNK_BYTES, "one chunk of an expert: a coordinator sends 1 MiB at a time"
        shard = self.shard
        if method in (RUN, SESSION) and shard is not None:
            return shard.max_request_bytes, (f"{shard.cfg.max_tokens} rows x {shard.layout.hidden_size} hidden x 4 "
                                             "bytes, and one layer's expert ids")
        return None

    def _check_ids(self, what: str, count: int, limit: int) -> None:
        # Sizes first, from len() alone: a list of millions of ids is refused before it is iterated.
        if count > limit:
            raise ValueError(f"{what} names {count} experts: expected at most {limit}")

    @_rpc(needs_model=False)
    async def Info(self, request, context):
        if self.shard is not None:
            return self.shard.info(VERSION).to_pb()
        device = self.cfg.offload.device
        return WorkerInfo(fingerprint="", hosted=frozenset(), device=device,
                          capacity_bytes=self.cfg.memory_bytes or 0, expert_bytes=0,
                          version=VERSION, num_layers=0, num_experts=0, hidden_size=0,
                          slots_per_layer=self.cfg.offload.slots_per_layer, expert_format="",
                          max_tokens=self.cfg.max_tokens, disk_bytes=self.cfg.disk_bytes or 0,
                          max_slots_per_layer=self.cfg.max_slots_per_layer or 0).to_pb()

    @_rpc(needs_model=False)
    async def Join(self, request, context):
        self._check_ids("Join", len(request.experts), _MAX_JOIN)
        missing, held, slots = await self._call(self._join, request)
        return pb.JoinResponse(missing=[pb.ExpertId(layer=k.layer, expert=k.expert) for k in missing],
                               held_bytes=held, slots_per_layer=slots)

    def _join(self, request: pb.JoinRequest) -> tuple[list[ExpertKey], int, int]:
        """On the compute thread: take the coordinator's model (built from its description when this worker has
        none, or has another and may switch), then the share: what must still be received. A new model is built and
        its share checked before it replaces the one being served: a refused Join changes nothing."""
        fingerprint = request.fingerprint
        if not FINGERPRINT.fullmatch(fingerprint):
            raise ValueError(f"fingerprint {quote(fingerprint)}: expected 32 hexadecimal digits")
        old = self.shard
        switching = old is not None and old.fingerprint != fingerprint
        if switching and (old.own_checkpoint or not self.cfg.allow_model_switch):
            old.check_fingerprint(fingerprint)  # refuses, naming both models
        shard = old
        if old is None or switching:
            if not request.HasField("description"):
                raise ValueError("Join carries no model description, and this worker has no model of its own: "
                                 "expected the coordinator's config.json and expert format (the same moeshard version "
                                 "on both sides)")
            description = description_from_pb(request.description)  # a WireError (a ValueError) when malformed
            shard = ExpertShard.from_push(self.cfg, fingerprint, description, self.disk)
        try:
            self._check_ids("Join", len(request.experts), shard.max_assign)
            if request.slots_per_layer < 0:
                raise ValueError(f"slots_per_layer {request.slots_per_layer}: expected >= 0 (0: the worker's own)")
            if request.policy and request.policy not in POLICIES:
                raise ValueError(f"policy {quote(request.policy)}: expected one of {list(POLICIES)} (or none: the "
                                 "worker's own)")
            answer = shard.join([ExpertKey(e.layer, e.expert) for e in request.experts], request.slots_per_layer,
                                request.policy)
        except BaseException:
            if shard is not old:
                shard.close()
            raise
        if shard is not old:
            if old is not None:
                logger.warning("a coordinator of another model (%s) takes this worker over from %s "
                               "(--allow-model-switch)", fingerprint, old.fingerprint)
            self.shard = shard
            if old is not None:
                old.close()
            logger.info("joined by a coordinator of %s (fingerprint %s)", shard.origin, fingerprint)
        return answer

    @_rpc
    async def PushExperts(self, request_iterator, context):
        if self.pushes >= self.max_pushes:
            raise OverCapacity(f"worker busy: {self.pushes} pushes under way (limit {self.max_pushes}): push again "
                               "once one has ended")
        shard = self.shard
        push = shard.incoming()
        self.pushes += 1
        try:
            experts, received = await self._receive(shard, push, request_iterator)
        except BaseException:
            await asyncio.shield(self._call(push.close))  # what completed is kept; what was cut off is dropped
            raise
        finally:
            self.pushes -= 1
        incomplete = await self._call(push.close)
        if incomplete:
            raise ReceiveError(f"the push ended in the middle of expert {tuple(incomplete[0])} ({len(incomplete)} "
                               f"incomplete, dropped; the {experts} complete experts were kept): expected every "
                               "expert sent whole")
        logger.info("received %d experts (%.1f MiB)", experts, received / 2**20)
        return pb.PushResponse(experts=experts, bytes=received)

    async def _receive(self, shard: ExpertShard, push, request_iterator) -> tuple[int, int]:
        """The chunks of one push, written through `push`; returns (experts verified, bytes received).

        Reading and writing overlap: this keeps taking chunks off the stream (so that the sender is never held at
        the 64 KiB flow-control window while a chunk is written and hashed) and hands them to a writer task
        through a queue of a few chunks, which bounds what is buffered."""
        received = 0
        chunks: asyncio.Queue = asyncio.Queue(maxsize=_PUSH_QUEUE)

        async def write() -> int:
            experts = 0
            while (item := await chunks.get()) is not None:
                key, chunk = item
                experts += await self._call(shard.receive, push, key, chunk.offset, chunk.data, chunk.sha256)
            return experts

        writer = asyncio.create_task(write())

        async def put(item) -> None:
            putting = asyncio.ensure_future(chunks.put(item))
            await asyncio.wait({putting, writer}, return_when=asyncio.FIRST_COMPLETED)
            if not putting.done():  # the writer stopped (a bad chunk): its error is the call's
                putting.cancel()
                writer.result()

        try:
            async for chunk in request_iterator:
                shard.check_fingerprint(chunk.fingerprint)
                await put((ExpertKey(chunk.expert.layer, chunk.expert.expert), chunk))
                received += len(chunk.data)
            await put(None)
            return await writer, received
        except BaseException:
            # The writer finishes the chunk it holds (never cancelled mid-write: the file is the thread's until
            # then) and is told to stop.
            while not chunks.empty():
                chunks.get_nowait()
            if not writer.done():
                chunks.put_nowait(None)
            await asyncio.shield(asyncio.gather(writer, return_exceptions=True))
            raise

    @_rpc
    async def Assign(self, request, context):
        self.shard.check_fingerprint(request.fingerprint)
        self._check_ids("Assign", len(request.experts), self.shard.max_assign)
        keys = [ExpertKey(e.layer, e.expert) for e in request.experts]
        hosted = await self._call(self.shard.assign, keys)
        return pb.AssignResponse(hosted=[pb.ExpertId(layer=k.layer, expert=k.expert) for k in sorted(hosted)])

    @_rpc
    async def RunExperts(self, request, context):
        return await self._call(self._run, request)

    def _run(self, request: pb.RunExpertsRequest) -> pb.RunExpertsResponse:
        """Check, decode, compute, encode: all on the compute thread."""
        s = self.shard
        s.check_fingerprint(request.fingerprint)
        self._check_ids("RunExperts", max(len(request.experts), len(request.counts)), s.num_experts)
        hidden = tensor_from_pb(request.hidden, max_elements=s.cfg.max_tokens * s.layout.hidden_size, name="hidden")
        # A hint is never an error: one naming more experts than a layer has is cut, never iterated whole.
        hint = (request.prefetch_layer, list(request.prefetch_experts[: s.num_experts])) \
            if request.prefetch_experts else None
        output, hits, misses = s.run(request.layer, list(request.experts), list(request.counts), hidden, hint)
        return pb.RunExpertsResponse(output=tensor_to_pb(output), hits=hits, misses=misses)

    async def Session(self, request_iterator, context):
        """The decode loop's stream: each RunExperts is answered in order, with its id; an error is a reply with
        a status code, and the stream stays open. Prefetch hints get no reply; an empty message (a ping) gets an
        empty one."""
        if self.sessions >= self.max_sessions:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"worker busy: {self.sessions} sessions open (limit {self.max_sessions})")
        self.sessions += 1
        try:
            async for reply in self._session(request_iterator):
                yield reply
        finally:
            self.sessions -= 1

    async def _session(self, request_iterator):
        async for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if kind is None:  # a ping: answered at once (the round trip of an empty call, for benchmarks)
                yield pb.SessionResponse(id=msg.id)
                continue
            if self.shard is None:
                code, message = self._no_model()
                yield pb.SessionResponse(id=msg.id, code=code.value[0], message=message)
                continue
            if kind == "prefetch":
                hint = msg.prefetch
                if hint.fingerprint == self.shard.fingerprint:
                    await self._call(self.shard.prefetch, hint.layer, list(hint.experts[: self.shard.num_experts]))
                continue
            self.inflight += 1  # busy: a drain waits for this message, not for the idle stream around it
            try:
                reply = await self._call(self._run, msg.run)
                yield pb.SessionResponse(id=msg.id, run=reply)
            except Exception as exc:  # every failure becomes a reply with a status; the stream goes on
                code = _status_for(exc)
                self.errors += 1
                if code == grpc.StatusCode.INTERNAL:
                    logger.exception("session RunExperts failed")
                yield pb.SessionResponse(id=msg.id, code=code.value[0], message=_message_for(exc))
            finally:
                self.inflight -= 1

    @_rpc
    async def Prefetch(self, request, context):
        self.shard.check_fingerprint(request.fingerprint)
        # A hint, never an error: ids past a layer's worth are cut before anything iterates them.
        issued = await self._call(self.shard.prefetch, request.layer, list(request.experts[: self.shard.num_experts]))
        return pb.PrefetchResponse(issued=issued)

    @_rpc
    async def Stats(self, request, context):
        stats = self.shard.stats()
        return dataclasses.replace(stats, errors=self.errors).to_pb()

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
        self.servicer = ExpertServicer(shard_cfg, server_cfg)
        self.address: str | None = None

    def preload(self) -> None:
        """Import, while the empty worker waits, what the first Join needs (transformers' model code and hqq): on
        the benchmark model these imports were 7 of the 8 s a first Join took. They run on the compute thread, the
        one a Join runs on, so a Join that comes meanwhile waits for them (transformers' lazy imports are not
        safe to race)."""
        self.servicer._compute.submit(_import_model_code)

    async def start(self) -> str:
        # grpc.aio objects belong to the event loop they are created on: build them here, not in __init__.
        self.health = health.aio.HealthServicer()
        cfg = self.server_cfg
        interceptors = [TokenInterceptor(cfg.token)] if cfg.token else []
        interceptors.append(MessageGuard(cfg.message_timeout_s, self.servicer, MessageBudget(cfg.message_memory_bytes),
                                         self.max_receive_bytes))
        self.server = grpc.aio.server(options=cfg.grpc_options(self.max_receive_bytes), interceptors=interceptors)
        pb_grpc.add_ExpertServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        host = cfg.listen.rsplit(":", 1)[0]
        try:
            if cfg.tls_cert is not None:
                creds = grpc.ssl_server_credentials([(cfg.tls_key, cfg.tls_cert)])
                port = self.server.add_secure_port(cfg.listen, creds)
            else:
                port = self.server.add_insecure_port(cfg.listen)
        except RuntimeError as exc:  # grpc raises when it cannot bind
            raise OSError(f"could not listen on {cfg.listen}: address already in use, or not an address of this "
                          "machine") from exc
        if port == 0:
            raise OSError(f"could not listen on {cfg.listen}: address already in use, or not an address of this "
                          "machine")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self.address = f"{host}:{port}"
        logger.info("listening on %s (NOT_SERVING until the checkpoint is loaded)", self.address)
        return self.address

    async def load(self) -> None:
        """With --model, open the checkpoint (SERVING once it is read); without, SERVING at once: the worker waits
        for a coordinator to join it and push its experts."""
        loop = asyncio.get_running_loop()
        if self.shard_cfg.memory_bytes is None:
            # The budget is measured once, at start: what this worker offers must not shrink as it fills, or every
            # coordinator would plan another placement (and push again) after the first one loaded its share.
            device = resolve_device(self.shard_cfg.offload.device)
            budget = await loop.run_in_executor(None, free_memory, device)
            self.shard_cfg = dataclasses.replace(self.shard_cfg, memory_bytes=budget)
            self.servicer.cfg = self.shard_cfg
        if self.shard_cfg.model is not None:
            self.servicer.shard = await loop.run_in_executor(None, ExpertShard.from_checkpoint, self.shard_cfg)
            self.servicer.loading = False
            logger.info("SERVING %s (fingerprint %s) on %s", self.shard_cfg.model, self.servicer.shard.fingerprint,
                        self.servicer.shard.device)
        else:
            logger.info("SERVING: waiting for a coordinator to join (experts will be received into %s)",
                        self.shard_cfg.received_root)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _set_health(self, status) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking new work, let in-flight requests finish (up to the grace period), then stop. Idle session
        streams are not work: once nothing is being computed, they are closed without waiting out the grace."""
        grace = self.server_cfg.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        stopping = asyncio.ensure_future(self.server.stop(grace))
        await asyncio.sleep(0)
        while not stopping.done() and loop.time() < deadline and self.servicer.inflight > 0:
            await asyncio.sleep(0.02)
        if not stopping.done():
            await self.server.stop(0)
        await stopping
        self.servicer.close()
        logger.info("stopped")

    async def wait(self) -> None:
        await self.server.wait_for_termination()
