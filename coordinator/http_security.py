"""The HTTP door of `serve`: who may come in (an API key) and how much a request may cost before it is refused.

`ServeConfig` holds the settings; `HttpGuard` (ASGI, in front of the OpenAI app) checks the key before anything
is read, caps the body's size and the time it may take, and turns any unexpected failure into an OpenAI-shaped
500; `GuardedH11Protocol` adds what uvicorn lacks below ASGI: a deadline for a request head and a cap on
connections. It knows nothing of models or generation. Nothing a client sends is logged verbatim: paths outside
the API's own routes are logged as "<other path>", headers and bodies never.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import h11
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..protos.access import API_KEY_ENV, api_key_from_env, is_loopback

logger = logging.getLogger(__name__)

MAX_HEADERS = 100  # a request with more headers gets 431
MAX_HEADER_BYTES = 32 << 10  # ... or with more bytes of header names and values in all
DRAIN_BYTES = 16 << 20  # read and dropped after a too-large body's 413 is decided, so the client sees it ...
DRAIN_S = 5.0  # ... for at most this long
DRAIN_IDLE_S = 0.5  # ... and while the client keeps sending
PROMPT_CHARS_PER_TOKEN = 16  # the default prompt limit per token of context: far above any tokenizer's average
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise; any other address needs api_key
    port: int = 8000  # 0 picks a free port (tests)
    api_key: str | None = None  # clients send `Authorization: Bearer <api_key>`; None: no check (loopback only)
    insecure_no_api_key: bool = False  # an explicit choice to serve off loopback without a key
    public_metrics: bool = False  # /metrics without the key (a scraper on a trusted network); /health is always open
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key the API speaks HTTPS only
    tls_key: Path | None = None  # PEM private key of tls_cert
    max_body_bytes: int = 4 << 20  # larger bodies get 413: refused from Content-Length, or while reading a chunked one
    max_prompt_chars: int | None = None  # longer prompts get 400 before tokenizing; None: 16 per token of context
    header_timeout_s: float = 10.0  # a connection that owes a request head longer than this is closed
    body_timeout_s: float = 60.0  # a request body not fully received this long after its head gets 408
    max_connections: int = 256  # past this, a new connection sheds the oldest that owes its request head, or gets 503
    max_connections_per_client: int = 128  # the same, per client address

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.api_key is not None and (not self.api_key or not all("!" <= c <= "~" for c in self.api_key)):
            raise ValueError("the API key must be non-empty printable ASCII without spaces (it travels in a header)")
        if self.api_key is not None and self.insecure_no_api_key:
            raise ValueError(f"--insecure-no-api-key contradicts the API key given (--api-key or {API_KEY_ENV}): "
                             "choose one")
        if not is_loopback(self.host) and self.api_key is None and not self.insecure_no_api_key:
            raise ValueError(f"serving on {self.host} (not loopback) needs an API key: pass --api-key or set "
                             f"{API_KEY_ENV} (and preferably --tls-cert/--tls-key), or --insecure-no-api-key to "
                             "let anyone who reaches the port generate")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_cert is not None:
            try:  # checked now, so a bad file fails before the model loads rather than after
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(self.tls_cert, self.tls_key, password="")  # never a password prompt
            except OSError as exc:  # ssl.SSLError is an OSError
                raise ValueError(f"--tls-cert {str(self.tls_cert)!r} / --tls-key {str(self.tls_key)!r}: cannot load "
                                 f"them as a PEM certificate chain and its unencrypted private key ({exc})") from None
        for name, flag in (("max_body_bytes", "--max-body-bytes"), ("max_prompt_chars", "--max-prompt-chars"),
                           ("max_connections", "--max-connections"),
                           ("max_connections_per_client", "--max-connections-per-client")):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} ({flag}) must be >= 1, got {value}")
        for name, flag in (("header_timeout_s", "--header-timeout"), ("body_timeout_s", "--body-timeout")):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"{name} ({flag}) must be > 0 seconds, got {getattr(self, name)}")

    def prompt_char_limit(self, context_length: int) -> int | None:
        """The longest prompt, in characters, tokenized at all (None: only the body limit bounds it)."""
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return PROMPT_CHARS_PER_TOKEN * context_length if context_length else None


def serve_config(args) -> ServeConfig:
    """`serve`'s arguments as a `ServeConfig`; the key comes from --api-key, else from the environment."""
    return ServeConfig(host=args.host, port=args.port,
                       api_key=args.api_key if args.api_key is not None else api_key_from_env(),
                       insecure_no_api_key=args.insecure_no_api_key, public_metrics=args.public_metrics,
                       tls_cert=args.tls_cert, tls_key=args.tls_key, max_body_bytes=args.max_body_bytes,
                       max_prompt_chars=args.max_prompt_chars, header_timeout_s=args.header_timeout,
                       body_timeout_s=args.body_timeout, max_connections=args.max_connections,
                       max_connections_per_client=args.max_connections_per_client)


def listen_socket(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound before the model loads: a port in use is one line at once, not an error
    after minutes of loading. (SO_REUSEADDR only, as uvicorn: a second server on the same port is refused.)"""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        hint = " (another server is using it: stop it or choose another --port)" if exc.errno == errno.EADDRINUSE else ""
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    sock.set_inheritable(True)
    return sock


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error shape. ASCII-escaped, so text that is not valid Unicode (a lone surrogate) still renders."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


async def send_error(send: Send, status: int, message: str, type_: str, code: str | None,
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """An OpenAI-shaped error, then the connection is closed (h11 closes after `connection: close`), so a body
    the client is still sending is never read."""
    body = error_body(message, type_, None, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class HttpGuard:
    """ASGI middleware in front of the API. Per request, in order: the API key (checked before anything is
    read; a refusal reads no body and does no work), the body (at most `max_body_bytes`, within
    `body_timeout_s`, read here once and handed on), then the app. An unexpected failure anywhere is logged
    once, with its traceback (`log_unexpected`), and answered with an OpenAI-shaped 500 if no reply has started."""

    def __init__(self, app: ASGIApp, cfg: ServeConfig, refusals: Counter, open_paths: frozenset[str],
                 known_paths: frozenset[str]):
        self.app, self.cfg, self.refusals = app, cfg, refusals
        self.key = cfg.api_key.encode() if cfg.api_key is not None else None
        self.open_paths = open_paths  # served without the key
        self.known_paths = known_paths  # logged as they are; any other path is logged as "<other path>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the API has none: closed (HTTP 403) before anything is read
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 0

        async def tracked_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        method = scope["method"] if scope["method"] in _METHODS else "<other method>"
        route = scope["path"] if scope["path"] in self.known_paths else "<other path>"
        try:
            await self._handle(scope, receive, tracked_send, f"{method} {route}")
        except Exception as exc:  # the one place unexpected failures end: logged once, answered in OpenAI's shape
            log_unexpected(logger, f"answering {method} {route}", exc)
            if not status:
                await send_error(tracked_send, 500, "internal server error (logged on the server)", "server_error",
                                 None)
        finally:
            logger.info("%s %s %s %d %.1f ms", _client(scope), method, route, status,
                        (time.perf_counter() - start) * 1e3)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        if scope.get("state", {}).get(RESERVE) and scope["path"] != "/health":
            await self._refuse(send, "busy", what, 503, "too many connections: try again later (this connection "
                               "holds one of those kept for /health)", "server_error", "server_busy")
            return
        headers = scope["headers"]
        if len(headers) > MAX_HEADERS or sum(len(n) + len(v) for n, v in headers) > MAX_HEADER_BYTES:
            await self._refuse(send, "headers_too_large", what, 431, f"too many or too large headers: at most "
                               f"{MAX_HEADERS} headers of {MAX_HEADER_BYTES} bytes in all", "invalid_request_error",
                               "headers_too_large")
            return
        if _content_length(headers) is not None and any(n == b"transfer-encoding" for n, _ in headers):
            await self._refuse(send, "ambiguous_length", what, 400, "a request may carry Content-Length or "
                               "Transfer-Encoding, not both", "invalid_request_error", "invalid_request")
            return
        authorized = self.key is None or hmac.compare_digest(_bearer_token(headers), self.key)
        scope.setdefault("state", {})["authorized"] = authorized  # /health tells more to a caller with the key
        if not authorized and scope["path"] not in self.open_paths:
            await self._refuse(send, "unauthorized", what, 401, "missing or wrong API key: send the header "
                               f"'Authorization: Bearer <key>' with the server's key (--api-key or {API_KEY_ENV})",
                               "invalid_request_error", "invalid_api_key", ((b"www-authenticate", b"Bearer"),))
            return
        declared = _content_length(headers)
        if declared is not None and declared > self.cfg.max_body_bytes:
            await self._too_large(send, receive, what, f"{declared} bytes")
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.cfg.body_timeout_s)
        except _BodyTooLarge:
            await self._too_large(send, receive, what, "more bytes")
            return
        except asyncio.TimeoutError:
            await self._refuse(send, "body_timeout", what, 408, f"the request body did not arrive within "
                               f"{self.cfg.body_timeout_s:g} s of its headers (--body-timeout)",
                               "invalid_request_error", "request_timeout")
            return
        except _ClientGone:
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.cfg.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send, receive: Receive, what: str, size: str) -> None:
        """413, after reading (and dropping) up to `DRAIN_BYTES` more of the body for at most `DRAIN_S`: a client that
        writes its whole body before reading (Python's http.client, urllib) then reads the 413 instead of a reset."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_drain(receive, DRAIN_BYTES), DRAIN_S)
        await self._refuse(send, "body_too_large", what, 413, f"the request body ({size}) is larger than this "
                           f"server's limit of {self.cfg.max_body_bytes} bytes (--max-body-bytes)",
                           "invalid_request_error", "request_too_large")

    async def _refuse(self, send: Send, reason: str, what: str, status: int, message: str, type_: str, code: str,
                      headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.refusals.labels(reason).inc()
        logger.debug("refused %s: %s", what, reason)
        await send_error(send, status, message, type_, code, headers)


class UnexpectedError(Exception):
    """Stands in for an exception in the log: its type and its message, truncated and quoted."""


def log_unexpected(log: logging.Logger, what: str, exc: Exception) -> None:
    """`log.exception`, except that the exception's message, which may quote what a client sent, is logged only
    truncated and quoted (control characters escaped), and chained exceptions are left out."""
    stand_in = UnexpectedError(f"{type(exc).__name__}: {str(exc)[:200]!r}")
    log.error("unexpected error %s", what, exc_info=(UnexpectedError, stand_in, exc.__traceback__))


async def _drain(receive: Receive, limit: int) -> None:
    """Reads the request's body until it ends, the client leaves, `limit` bytes have been dropped or nothing has
    come for `DRAIN_IDLE_S`."""
    dropped = 0
    while dropped <= limit:
        try:
            message = await asyncio.wait_for(receive(), DRAIN_IDLE_S)
        except asyncio.TimeoutError:
            return
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
        dropped += len(message.get("body", b""))


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read by the guard, once; then the client's own channel (a disconnect stops a stream)."""
    delivered = False

    async def replayed() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has checked that it is a number
    return None


def _client(scope: Scope) -> str:
    client = scope.get("client")  # the socket's peer: uvicorn runs with proxy_headers off
    return f"{client[0]}:{client[1]}" if client else "-"


_BUSY = error_body("too many connections: try again later", "server_error", None, "server_busy")
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: "
                 + str(len(_BUSY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BUSY)
RESERVE = "moeshard.reserve"  # in a request's scope["state"]: its connection holds one of the slots kept for /health


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol without its access log, and with the bounds on connections it lacks, so that idle or
    slow sockets cannot keep anyone else out:

    - a deadline for the request head (uvicorn's keep-alive timer only runs between requests and restarts on every
      byte, so a head sent byte by byte held a connection for ever), and a shorter one for a new connection's first
      byte;
    - `max_connections` in all and `max_connections_per_client` per client address. A connection past either cap
      sheds the oldest connection that has owed a request head for `SHED_AFTER_S` (of its own address, or of the
      address holding the most) instead of being refused: a socket that has not sent its request costs nothing to
      drop, and a client that sends its request at once is never the one shed;
    - when no connection can be shed (all are in requests), `HEALTH_RESERVE` more are accepted for /health alone:
      any other request on them gets 503 (`HttpGuard` reads the mark), so /health answers whatever the load.

    uvicorn builds one per connection: `limits` arrives through `functools.partial`."""

    HEALTH_RESERVE = 8
    FIRST_BYTE_S = 2.0  # a new connection that has sent nothing this long is closed (at most header_timeout_s)
    SHED_AFTER_S = 0.5  # a connection that has owed its request head this long may be shed for a new one

    def __init__(self, *args, limits: ServeConfig, refusals: Counter, **kwargs):
        super().__init__(*args, **kwargs)
        self.access_log = False  # uvicorn's access line holds the path as the client wrote it; HttpGuard logs instead
        self.limits, self.refusals = limits, refusals
        self.head_deadline: asyncio.TimerHandle | None = None
        self.opened = self.idle_since = 0.0
        self.awaiting_first_byte = True

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.opened = self.idle_since = self.loop.time()
        mine = [c for c in self.connections if c is not self and _host(c) == _host(self)]
        if len(mine) >= self.limits.max_connections_per_client and not self._shed(mine):
            self._refuse(f"{len(mine)} open from one client, the limit is {self.limits.max_connections_per_client} "
                         "(--max-connections-per-client)")
            return
        others = [c for c in self.connections if c is not self]
        if len(others) >= self.limits.max_connections and not self._shed(_busiest_first(others)):
            if len(others) >= self.limits.max_connections + self.HEALTH_RESERVE:
                self._refuse(f"{len(others)} open, the limit is {self.limits.max_connections} (--max-connections) "
                             f"and the {self.HEALTH_RESERVE} kept for /health are taken")
                return
            self.app_state = {**self.app_state, RESERVE: True}  # copied into each request's scope["state"]
        self.watch_head()

    def _shed(self, candidates: list) -> bool:
        """Closes the oldest of `candidates` that has owed a request head for `SHED_AFTER_S`; False when none has."""
        idle = [c for c in candidates if isinstance(c, GuardedH11Protocol) and c.sheddable()]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.opened)
        self.refusals.labels("shed").inc()
        logger.debug("closed a connection that owed its request head, to make room for a new one")
        victim.stop_watch()
        victim.transport.close()
        victim.connections.discard(victim)  # counted out now: its connection_lost comes on a later loop turn
        return True

    def _refuse(self, why: str) -> None:
        self.refusals.labels("busy").inc()
        logger.warning("refused a connection: %s", why)
        self.connections.discard(self)
        self.transport.write(BUSY_RESPONSE)
        self.transport.close()

    def sheddable(self) -> bool:
        """Between requests for `SHED_AFTER_S` at least: no head has arrived (h11's IDLE: a new connection or a
        kept-alive one), no reply is being sent. (A client that has just connected is about to send its head.)"""
        return (self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE
                and not self.transport.is_closing() and self.loop.time() - self.idle_since >= self.SHED_AFTER_S)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.idle_since = self.loop.time()  # kept alive, it owes the next request's head from now

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        first, self.awaiting_first_byte = self.awaiting_first_byte, False
        self.watch_head(first_bytes=first)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_watch()
        super().connection_lost(exc)

    def watch_head(self, first_bytes: bool = False) -> None:
        """The deadline runs while the client owes a request head (h11's IDLE: a new connection, or the first
        bytes of the next request on a kept-alive one) and stops once a whole head has arrived. A new connection
        has `FIRST_BYTE_S` for its first byte and `header_timeout_s` from its opening for the whole head."""
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self.stop_watch()
        elif first_bytes:  # a new connection's first bytes came: the rest of the head's own deadline
            self.stop_watch()
            self.head_deadline = self.loop.call_at(self.opened + self.limits.header_timeout_s, self.head_timed_out)
        elif self.head_deadline is None:  # a new connection, or the next request on a kept-alive one has begun
            delay = self.limits.header_timeout_s
            if self.awaiting_first_byte:
                delay = min(self.FIRST_BYTE_S, delay)
            self.head_deadline = self.loop.call_later(delay, self.head_timed_out)

    def stop_watch(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def head_timed_out(self) -> None:
        self.head_deadline = None
        if not self.transport.is_closing():
            self.refusals.labels("header_timeout").inc()
            logger.debug("closed a connection that sent no whole request head in time")
            self.transport.close()


def _host(protocol) -> str | None:
    client = getattr(protocol, "client", None)
    return client[0] if client else None


def _busiest_first(connections: list) -> list:
    """The connections of the client address that holds the most among those with one to shed."""
    idle: dict[str | None, int] = {}
    for c in connections:
        if isinstance(c, GuardedH11Protocol) and c.sheddable():
            idle[_host(c)] = 0
    for c in connections:
        if _host(c) in idle:
            idle[_host(c)] += 1
    if not idle:
        return []
    host = max(idle, key=idle.get)
    return [c for c in connections if _host(c) == host]
