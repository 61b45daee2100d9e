"""`serve`'s HTTP door under attack: the API key, body and prompt limits, slow clients, the connection cap, TLS,
bad input (always a 4xx or an OpenAI-shaped 500, never plain text) and parameters that are refused, not ignored.

Servers are the real thing `serve` runs (`build_server`: uvicorn with the guarded h11 protocol) in a thread on
127.0.0.1 port 0, over the tiny checkpoint; clients are the official openai client, urllib and raw sockets.
Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime

import ipaddress
from http.client import HTTPConnection
import json
import logging
import select
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from moeshard.cli import main
from moeshard.coordinator import commands
from moeshard.coordinator.cli import build_parser
from moeshard.coordinator.engine import Engine
from moeshard.coordinator.http_security import ServeConfig, serve_config
from moeshard.coordinator.batching import Batcher
from moeshard.coordinator.server import build_server
from moeshard.offload_core import OffloadConfig

from .workers import run_server_in_thread

KEY = "test-key-4f1c9a"
PROMPT = "def add(a, b):"
MARKER = "MARKER7Q"  # client-written text that must never reach a log


@pytest.fixture(scope="module")
def engine(tiny_tok_ckpt):
    engine = Engine.load(tiny_tok_ckpt, OffloadConfig(slots_per_layer=2, prefetch=1), progress=False)
    yield engine
    engine.close()


@contextlib.contextmanager
def running(engine: Engine, cfg: ServeConfig):
    """A server as `serve` builds it, on a free loopback port; yields (base URL, port)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(engine, cfg, log_level="warning")
    thread = run_server_in_thread(server, sock, 30)
    scheme = "https" if cfg.tls_cert is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def keyed(engine):
    """An API key and tight limits, so that every bound is reached in about a second."""
    cfg = ServeConfig(port=0, api_key=KEY, max_body_bytes=1 << 20, header_timeout_s=1.0, body_timeout_s=1.0)
    with running(engine, cfg) as (base, port):
        yield base, port


@pytest.fixture(scope="module")
def open_server(engine):
    """The defaults `serve` starts with on loopback: no key, 4 MiB bodies, 16 prompt characters per context token."""
    with running(engine, ServeConfig(port=0)) as (base, port):
        yield base, port


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None, timeout: float = 30,
         context: ssl.SSLContext | None = None) -> tuple[int, dict, str]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as reply:
            return reply.status, dict(reply.headers), reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def auth(key: str = KEY) -> dict:
    return {"authorization": f"Bearer {key}"}


def openai_error(text: str) -> dict:
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def read_reply(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection (closed=True) or `timeout` passes (closed=False)."""
    data, deadline = b"", time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def status_and_error(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), openai_error(body.decode())


def request_head(path: str, headers: dict, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def scrape(base: str, headers: dict | None = None) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(http("GET", f"{base}/metrics", headers=headers)[2]):
        for sample in family.samples:
            key = sample.name + "".join(f"|{v}" for v in sample.labels.values())
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def rss() -> int:
    return psutil.Process().memory_info().rss


@contextlib.contextmanager
def captured_logs():
    """Every record any logger writes (root and uvicorn's own, which do not propagate), at DEBUG."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def formatted(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
        text += logging.Formatter().formatException(record.exc_info)
    return text


# -- 9. the API key ---------------------------------------------------------------------------------

def test_without_the_key_every_route_but_health_is_401_and_no_work_is_done(keyed, engine, monkeypatch):
    base, _ = keyed
    calls = []
    monkeypatch.setattr(engine, "encode_prompt", lambda *a: calls.append(a))
    monkeypatch.setattr(engine, "encode_chat", lambda *a: calls.append(a))
    before = scrape(base, auth())
    completion = {"model": engine.name, "prompt": PROMPT, "max_tokens": 2}
    chat = {"model": engine.name, "messages": [{"role": "user", "content": "hi"}]}
    requests = [("POST", "/v1/completions", completion), ("POST", "/v1/chat/completions", chat),
                ("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/openapi.json", None),
                ("GET", "/docs", None), ("GET", "/no/such/path", None), ("DELETE", "/v1/models", None)]
    wrong = [{}, auth("wrong"), auth(KEY + "x"), auth(KEY[:-1]), {"authorization": f"Basic {KEY}"},
             {"authorization": KEY}, {"authorization": "Bearer"}]
    for headers in wrong:
        for method, path, body in requests:
            status, reply_headers, text = http(method, base + path, body, headers)
            assert status == 401, (headers, path, text)
            assert openai_error(text)["code"] == "invalid_api_key"
            assert reply_headers.get("www-authenticate") == "Bearer"
    assert calls == []
    after = scrape(base, auth())
    assert after["moeshard_http_refusals_total|unauthorized"] - before.get(
        "moeshard_http_refusals_total|unauthorized", 0) == len(wrong) * len(requests)
    ok = "moeshard_requests_total|completions|ok"
    assert after.get(ok, 0) == before.get(ok, 0)


def test_openai_client_with_and_without_the_key(keyed, engine):
    base, _ = keyed
    good = OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()] == [engine.name]
    assert good.completions.create(model=engine.name, prompt=PROMPT, max_tokens=3, temperature=0).choices
    bad = OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=engine.name, prompt=PROMPT, max_tokens=3)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "hi"}], stream=True)


def test_health_is_open_but_says_more_only_with_the_key(keyed, engine):
    base, _ = keyed
    status, _, text = http("GET", f"{base}/health")
    assert status == 200 and json.loads(text) == {"status": "ok"}
    status, _, text = http("GET", f"{base}/health", headers=auth())
    assert status == 200 and json.loads(text)["model"] == engine.name
    assert http("GET", f"{base}/metrics")[0] == 401
    assert http("GET", f"{base}/metrics", headers=auth())[0] == 200


def test_public_metrics_opens_metrics_and_nothing_else(engine):
    with running(engine, ServeConfig(port=0, api_key=KEY, public_metrics=True)) as (base, _):
        status, _, text = http("GET", f"{base}/metrics")
        assert status == 200 and "moeshard_expert_hits_total" in text
        assert http("GET", f"{base}/v1/models")[0] == 401


def test_a_client_without_the_key_is_refused_before_its_body_is_read(keyed, engine, monkeypatch):
    _, port = keyed
    calls = []
    monkeypatch.setattr(engine, "encode_prompt", lambda *a: calls.append(a))
    before = rss()
    for framing in ({"content-length": str(30 << 20)}, {"transfer-encoding": "chunked"}):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request_head("/v1/completions", {"content-type": "application/json", **framing}))
            first = b'{"model": "m", "prompt": "' + b"a" * 65536  # the rest of the 30 MB never comes
            sock.sendall(first if "content-length" in framing else b"%x\r\n%s\r\n" % (len(first), first))
            reply, closed = read_reply(sock, timeout=5)
        status, error = status_and_error(reply)
        assert status == 401 and error["code"] == "invalid_api_key"
        assert closed, "the server must close the connection rather than read the rest of the body"
    assert calls == []
    assert rss() - before < 32 << 20


def test_logs_hold_nothing_a_client_wrote(keyed, engine):
    base, port = keyed
    with captured_logs() as records:
        http("GET", f"{base}/v1/{MARKER}?q={MARKER}", headers={"x-note": MARKER, "user-agent": MARKER})
        http("POST", f"{base}/v1/completions", {"model": MARKER, "prompt": MARKER}, auth(MARKER))
        http("GET", f"{base}/%1b[31m{MARKER}", headers=auth())  # a terminal escape, percent-encoded
        http("POST", f"{base}/v1/completions", {"model": MARKER, "prompt": "x", MARKER: 1}, auth())
        http("POST", f"{base}/v1/completions", b"{" + MARKER.encode(), auth())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # not even HTTP
            sock.sendall(f"{MARKER} {MARKER}\r\n\r\n".encode())
            read_reply(sock, timeout=5)
        assert http("GET", f"{base}/v1/models", headers=auth())[0] == 200
        deadline = time.monotonic() + 5  # the guard logs a request once its reply is sent
        while not any("GET /v1/models 200" in r.getMessage() for r in records):
            assert time.monotonic() < deadline, "requests are logged (without their content)"
            time.sleep(0.02)
    texts = [formatted(r) for r in records]
    assert not [t for t in texts if MARKER in t or "\x1b" in t]


# -- 8. body and prompt limits; tokenizing off the event loop ---------------------------------------

def test_a_body_over_the_limit_is_refused_from_its_content_length(keyed):
    _, port = keyed
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request_head("/v1/completions", {**auth(), "content-length": str((1 << 20) + 1)}))
        reply, closed = read_reply(sock, timeout=5)  # no body sent: the answer cannot depend on reading one
    status, error = status_and_error(reply)
    assert status == 413 and error["code"] == "request_too_large" and str(1 << 20) in error["message"]
    assert closed


def test_a_chunked_body_is_refused_once_it_passes_the_limit(keyed):
    _, port = keyed
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request_head("/v1/completions", {**auth(), "transfer-encoding": "chunked"}))
        chunk = b"a" * (64 << 10)
        for _ in range(16):  # exactly the limit, then one byte more, and nothing after it
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"1\r\na\r\n")
        reply, closed = read_reply(sock, timeout=5)
    status, error = status_and_error(reply)
    assert status == 413 and error["code"] == "request_too_large"
    assert closed


@pytest.mark.slow
def test_a_body_that_does_not_arrive_in_time_gets_408(keyed):
    _, port = keyed
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request_head("/v1/completions", {**auth(), "content-length": "100"}) + b'{"model": ')
        reply, closed = read_reply(sock, timeout=5)
    status, error = status_and_error(reply)
    assert status == 408 and error["code"] == "request_timeout"
    assert closed


def test_health_answers_at_once_while_a_30mb_prompt_is_sent(open_server, engine):
    base, port = open_server
    outcome: list = []

    def send_30mb():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(request_head("/v1/completions", {"transfer-encoding": "chunked"}))
                sock.sendall(b'1b\r\n{"model": "m", "prompt": "\r\n')
                chunk = b"a" * (1 << 20)
                for _ in range(30):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sock.sendall(b'2\r\n"}\r\n0\r\n\r\n')
                outcome.append(read_reply(sock, timeout=30)[0][:12])
        except OSError as exc:  # the server refused and closed while we were still sending
            outcome.append(exc)

    before = rss()
    sender = threading.Thread(target=send_30mb, daemon=True)
    sender.start()
    latencies = []
    deadline = time.monotonic() + 60
    while (sender.is_alive() or len(latencies) < 20) and time.monotonic() < deadline:
        start = time.perf_counter()
        assert http("GET", f"{base}/health", timeout=5)[0] == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.02)
    sender.join(timeout=5)
    assert outcome and (isinstance(outcome[0], OSError) or outcome[0].startswith(b"HTTP/1.1 413")), outcome
    assert max(latencies) < 1.0, f"/health took up to {max(latencies) * 1e3:.0f} ms (target < 100 ms)"
    assert rss() - before < 64 << 20


def test_a_prompt_over_the_character_limit_is_refused_before_tokenizing(open_server, engine, monkeypatch):
    base, _ = open_server
    limit = 16 * engine.context_length
    calls = []
    monkeypatch.setattr(engine, "encode_prompt", lambda *a: calls.append(a))
    monkeypatch.setattr(engine, "encode_chat", lambda *a: calls.append(a))
    status, _, text = http("POST", f"{base}/v1/completions", {"model": engine.name, "prompt": "a" * (limit + 1)})
    error = openai_error(text)
    assert status == 400 and error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert f"{limit + 1} characters" in error["message"] and str(limit) in error["message"]
    half = "a" * (limit // 2 + 1)
    status, _, text = http("POST", f"{base}/v1/chat/completions",
                           {"model": engine.name, "messages": [{"role": "user", "content": half}] * 2})
    assert status == 400 and openai_error(text)["param"] == "messages"
    assert calls == []


@pytest.mark.slow  # a tokenizer held for a second
@pytest.mark.parametrize("endpoint, method", [("completions", "encode_prompt"), ("chat/completions", "encode_chat")])
def test_tokenizing_runs_off_the_event_loop(open_server, engine, monkeypatch, endpoint, method):
    base, _ = open_server
    entered = threading.Event()
    real = getattr(engine, method)

    def slow(*args):
        entered.set()
        time.sleep(1.5)  # a tokenizer busy with a long prompt
        return real(*args)

    monkeypatch.setattr(engine, method, slow)
    body = ({"model": engine.name, "prompt": PROMPT, "max_tokens": 2} if method == "encode_prompt" else
            {"model": engine.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    result: list = []
    client = threading.Thread(target=lambda: result.append(http("POST", f"{base}/v1/{endpoint}", body)), daemon=True)
    client.start()
    assert entered.wait(timeout=10)
    start = time.perf_counter()
    assert http("GET", f"{base}/health", timeout=5)[0] == 200
    waited = time.perf_counter() - start
    client.join(timeout=30)
    assert result and result[0][0] == 200
    assert waited < 1.0, f"/health waited {waited:.2f} s for the tokenizer"


# -- 10. bad input is a 4xx; the unexpected is an OpenAI-shaped 500 ----------------------------------

@pytest.mark.parametrize("endpoint, body, param", [
    ("completions", b'{"model": "MODEL", "prompt": "\\ud800"}', "prompt"),
    ("completions", b'{"model": "MODEL", "prompt": ["ok \\udfff"]}', "prompt"),
    ("completions", b'{"model": "MODEL", "prompt": "x", "stop": ["\\ud800"]}', "stop"),
    ("completions", b'{"model": "\\ud800", "prompt": "x"}', "model"),
    ("chat/completions", b'{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages.0.content"),
    ("chat/completions", b'{"model": "MODEL", "messages": [{"role": "user", "content": '
                         b'[{"type": "text", "text": "\\ud800"}]}]}', "messages.0.content"),
    ("chat/completions", b'{"model": "MODEL", "messages": [{"role": "user", "content": '
                         b'[{"type": "image_url", "image_url": {"url": "http://x"}}]}]}', "messages.0.content"),
    ("completions", b'{"model": "MODEL", "prompt": "x", "temperature": NaN}', "temperature"),
    ("completions", b'{"model": "MODEL", "prompt": "x", "seed": 100000000000000000000000}', "seed"),
    ("completions", b'{"model": "MODEL", "prompt": "x", "stop": ["' + b"y" * 300 + b'"]}', "stop"),
    ("completions", b'{"model": "MODEL", "prompt": "", "stream": true}', "prompt"),
    ("completions", b'{"model": "MODEL", "prompt": "x", "stream_options": {"include_usage": true}}', "stream_options"),
])
def test_bad_input_is_a_4xx_in_openai_shape(open_server, engine, endpoint, body, param):
    base, _ = open_server
    status, headers, text = http("POST", f"{base}/v1/{endpoint}", body.replace(b"MODEL", engine.name.encode()))
    assert status == 400, text
    assert headers["content-type"] == "application/json"
    assert openai_error(text)["param"] == param


@pytest.mark.slow  # its own server
def test_a_chat_template_that_refuses_the_messages_is_a_400(tmp_path):
    from .conftest import make_checkpoint, save_tiny_tokenizer

    path = make_checkpoint(tmp_path, seed=5, vocab_size=300, pad_token_id=0)
    save_tiny_tokenizer(path, chat_template="{% for m in messages %}{% if m['role'] == 'system' %}"
                                            "{{ raise_exception('no system messages here') }}{% endif %}"
                                            "{{ m['content'] }}{% endfor %}")
    templated = Engine.load(path, OffloadConfig(slots_per_layer=2, prefetch=1), progress=False)
    try:
        with running(templated, ServeConfig(port=0)) as (base, _):
            body = {"model": templated.name, "max_tokens": 2, "messages": [{"role": "system", "content": "be brief"}]}
            status, _, text = http("POST", f"{base}/v1/chat/completions", body)
            error = openai_error(text)
            assert status == 400 and error["param"] == "messages" and "no system messages here" in error["message"]
            body["messages"] = [{"role": "user", "content": "class Point:"}]
            assert http("POST", f"{base}/v1/chat/completions", body)[0] == 200
    finally:
        templated.close()


def test_a_vanishing_temperature_decodes_greedily(open_server, engine):
    base, _ = open_server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    greedy = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=12, temperature=0)
    tiny = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=12, temperature=5e-324)
    assert tiny.choices[0].text == greedy.choices[0].text


def test_an_unexpected_failure_is_an_openai_500_logged_once(open_server, engine, monkeypatch):
    base, _ = open_server

    async def broken(*args, **kwargs):  # a failure whose message quotes a client, at length and with an escape
        raise RuntimeError(f"internal detail {MARKER}\x1b[31m" + "z" * 1000)

    monkeypatch.setattr(Batcher, "generate", broken)
    with captured_logs() as records:
        status, headers, text = http("POST", f"{base}/v1/completions", {"model": engine.name, "prompt": PROMPT})
    assert status == 500 and headers["content-type"] == "application/json"
    error = openai_error(text)
    assert error["type"] == "server_error" and MARKER not in error["message"]
    logged = [formatted(r) for r in records if r.exc_info]
    assert len(logged) == 1 and "POST /v1/completions" in logged[0] and "in broken" in logged[0]  # with its traceback
    assert f"RuntimeError: 'internal detail {MARKER}\\x1b[31m" in logged[0]  # quoted, the escape escaped
    assert "\x1b" not in logged[0] and "z" * 300 not in logged[0]  # and truncated
    monkeypatch.undo()
    assert http("POST", f"{base}/v1/completions", {"model": engine.name, "prompt": PROMPT, "max_tokens": 2})[0] == 200


# -- 11. parameters: implemented, or refused by name ------------------------------------------------

@pytest.mark.parametrize("endpoint, param, value", [
    ("completions", "best_of", 2), ("completions", "suffix", "tail"),
    ("completions", "presence_penalty", 0.5), ("completions", "frequency_penalty", -1),
    ("completions", "max_completion_tokens", 4), ("completions", "made_up", 1),
    ("chat/completions", "top_logprobs", 3),  # without logprobs: true
    ("chat/completions", "response_format", {"type": "json_schema"}),  # without its json_schema
    ("chat/completions", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("chat/completions", "tool_choice", "auto"), ("chat/completions", "parallel_tool_calls", True),
    ("chat/completions", "store", True), ("chat/completions", "echo", True),
])
def test_unimplemented_parameters_are_refused_by_name(open_server, engine, endpoint, param, value):
    base, _ = open_server
    body = ({"model": engine.name, "prompt": PROMPT} if endpoint == "completions" else
            {"model": engine.name, "messages": [{"role": "user", "content": "hi"}]})
    status, _, text = http("POST", f"{base}/v1/{endpoint}", {**body, param: value, "max_tokens": 2})
    error = openai_error(text)
    assert status == 400 and error["param"] == param and param in error["message"], text


def test_unimplemented_message_fields_are_refused(open_server, engine):
    base, _ = open_server
    messages = [{"role": "user", "content": "hi", "name": "bob"}]
    status, _, text = http("POST", f"{base}/v1/chat/completions", {"model": engine.name, "messages": messages})
    assert status == 400 and openai_error(text)["param"] == "messages.0.name"


def test_openai_client_defaults_are_accepted(open_server, engine):
    base, _ = open_server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": [{"type": "text", "text": "class Point:"}]}]
    plain = client.chat.completions.create(model=engine.name, messages=messages, max_tokens=8, temperature=0)
    explicit = client.chat.completions.create(
        model=engine.name, messages=messages, max_completion_tokens=8, temperature=0, top_p=1, n=1, seed=1,
        presence_penalty=0, frequency_penalty=0, logit_bias={}, logprobs=False, response_format={"type": "text"},
        tools=[], tool_choice="none", user="someone", stop=None)
    assert explicit.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=engine.name, messages=messages, top_logprobs=2)


def test_stream_options_include_usage_sends_a_last_chunk_with_no_choices(open_server, engine):
    base, _ = open_server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "class Point:"}]
    full = client.chat.completions.create(model=engine.name, messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=engine.name, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert all(c.choices and c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content


def test_echo_puts_the_prompt_before_the_completion(open_server, engine):
    base, _ = open_server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    plain = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=10, temperature=0)
    echoed = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    streamed = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=10, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + plain.choices[0].text


# -- 12. slow clients and the connection cap -------------------------------------------------------

@pytest.mark.slow
def test_connections_that_never_finish_their_headers_are_closed(keyed):
    base, port = keyed
    partial = [b"", b"POST /v1/compl", b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"]
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
    kept_alive = socket.create_connection(("127.0.0.1", port), timeout=5)  # one request, then a slow second
    kept_alive.sendall(request_head("/health", {}, "GET"))
    assert kept_alive.recv(65536).startswith(b"HTTP/1.1 200")
    socks.append(kept_alive)
    try:
        for sock, data in zip(socks, partial):
            sock.sendall(data)
        dripping = socks[3:]  # these send one more header byte every 0.2 s, for ever
        for sock in dripping:
            sock.sendall(b"GET /health HTTP/1.1\r\nx-slow: ")
        assert http("GET", f"{base}/v1/models", headers=auth(), timeout=5)[0] == 200  # others are served meanwhile
        open_ = set(socks)
        start, deadline = time.monotonic(), time.monotonic() + 6  # the bound is header_timeout_s = 1 s
        while open_ and time.monotonic() < deadline:
            for sock in [s for s in dripping if s in open_]:
                try:
                    sock.sendall(b"a")
                except OSError:
                    open_.discard(sock)
            readable, _, _ = select.select(list(open_), [], [], 0.2)
            for sock in readable:
                try:
                    if sock.recv(65536) == b"":
                        open_.discard(sock)
                except OSError:
                    open_.discard(sock)
        assert not open_, f"{len(open_)} of {len(socks)} slow connections still open after 6 s"
        assert time.monotonic() - start < 4
    finally:
        for sock in socks:
            sock.close()


def slow_body(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection in a request: its head sent, its body owed (it holds its slot until --body-timeout)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.sendall(request_head("/v1/completions", {"content-length": "100"}) + b'{"model": ')
    return sock


@pytest.mark.slow
def test_idle_and_slow_sockets_cannot_keep_others_out(engine):
    """Round 3, 1: 70 sockets that never finish their head, re-opened as they are closed, against 16 slots: every
    /health probe and every completion is served, because a new connection sheds the oldest idle one."""
    cfg = ServeConfig(port=0, max_connections=16, max_connections_per_client=16)
    with running(engine, cfg) as (base, port):
        stop, opened = threading.Event(), [0]

        def attacker():
            socks: list[socket.socket] = []
            while not stop.is_set():
                socks = [s for s in socks if s.fileno() >= 0 and not _closed(s)]
                while len(socks) < 70 and not stop.is_set():
                    try:
                        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                    except OSError:
                        break
                    if opened[0] % 2:
                        sock.sendall(b"GET /health HTTP/1.1\r\nx-slow: ")  # a head that never ends
                    socks.append(sock)
                    opened[0] += 1
                for sock in socks:
                    with contextlib.suppress(OSError):
                        sock.send(b"a") if opened[0] % 2 else None
                time.sleep(0.05)
            for sock in socks:
                sock.close()

        thread = threading.Thread(target=attacker, daemon=True)
        thread.start()
        try:
            time.sleep(1.0)
            statuses, latencies = [], []
            for i in range(20):
                start = time.monotonic()
                statuses.append(http("GET", f"{base}/health", timeout=10)[0])
                latencies.append(time.monotonic() - start)
                if i % 5 == 0:
                    statuses.append(http("POST", f"{base}/v1/completions", {"model": engine.name, "prompt": "x",
                                                                             "max_tokens": 2}, timeout=30)[0])
                time.sleep(0.1)
        finally:
            stop.set()
            thread.join(timeout=10)
        assert opened[0] > 70  # the attacker kept re-opening what was shed
        assert statuses == [200] * len(statuses), statuses
        assert max(latencies) < 2.0, latencies


def _closed(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except OSError:
        return True


@pytest.mark.slow
def test_when_every_slot_is_in_a_request_health_still_answers(engine):
    cfg = ServeConfig(port=0, max_connections=3)
    with running(engine, cfg) as (base, port):
        busy = [slow_body(port) for _ in range(3)]
        try:
            time.sleep(0.7)  # older than SHED_AFTER_S, but in requests: nothing to shed
            assert http("GET", f"{base}/health", timeout=5)[0] == 200  # a slot kept for /health
            status, _, text = http("GET", f"{base}/v1/models", timeout=5)
            assert status == 503 and openai_error(text)["code"] == "server_busy"
        finally:
            for sock in busy:
                sock.close()
        deadline = time.monotonic() + 10
        while http("GET", f"{base}/v1/models", timeout=5)[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)


@pytest.mark.slow
def test_one_client_address_cannot_take_every_slot(engine):
    cfg = ServeConfig(port=0, max_connections=50, max_connections_per_client=3)
    with running(engine, cfg) as (base, port):
        busy = [slow_body(port, "127.0.0.2") for _ in range(3)]
        try:
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)) as extra:
                reply, closed = read_reply(extra, timeout=5)
            status, error = status_and_error(reply)
            assert status == 503 and error["code"] == "server_busy" and closed
            assert http("GET", f"{base}/v1/models", timeout=5)[0] == 200  # another address is served
        finally:
            for sock in busy:
                sock.close()


def test_a_body_over_the_limit_written_whole_first_reads_its_413(keyed):
    """Round 3, 3: http.client writes the whole body before it reads: it gets the 413, not a reset."""
    _, port = keyed
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/completions", body=b"x" * (6 << 20), headers={**auth(), "content-type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 413 and openai_error(reply.read().decode())["code"] == "request_too_large"
    finally:
        conn.close()


@pytest.mark.parametrize("head, status", [
    (request_head("/v1/models", {"content-length": "5", "transfer-encoding": "chunked"}, "GET"), 400),
    (request_head("/v1/models", {f"x-h{i}": "v" for i in range(10_000)}, "GET"), 431),
    (request_head("/v1/models", {"x-long": "v" * 100_000}, "GET"), 431),
])
def test_ambiguous_or_oversized_heads_are_refused(open_server, head, status):
    _, port = open_server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        reply, _ = read_reply(sock, timeout=5)
    assert reply.startswith(f"HTTP/1.1 {status}".encode()), reply[:200]


@pytest.mark.parametrize("field, value", [("max_tokens", "12"), ("stream", "yes"), ("temperature", "0.5"),
                                          ("max_tokens", 12.0), ("seed", True)])
def test_types_are_json_s_own_not_coerced(open_server, engine, field, value):
    base, _ = open_server
    status, _, text = http("POST", f"{base}/v1/completions", {"model": engine.name, "prompt": "x", field: value})
    assert status == 400 and openai_error(text)["param"] == field, text


@pytest.mark.parametrize("endpoint, body, param", [
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}] * 110_000}, "messages"),
    ("completions", {"prompt": "x", "stop": ["s"] * 700_000}, "stop"),
    ("completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(1000)}}, "logit_bias"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 1000}]},
     "messages.0.content"),
])
def test_long_lists_are_refused_before_validation(open_server, engine, endpoint, body, param, monkeypatch):
    base, _ = open_server
    validated = []
    monkeypatch.setattr(BaseModel, "model_validate", classmethod(lambda cls, *a, **k: validated.append(cls)))
    status, _, text = http("POST", f"{base}/v1/{endpoint}", {"model": engine.name, **body})
    assert status == 400 and openai_error(text)["param"] == param, text[:300]
    assert not validated


@pytest.mark.slow
def test_health_stays_prompt_while_large_bodies_are_parsed(open_server, engine):
    """Round 3, 2: 8 chat bodies of 3.7 MB at once (tiny messages, refused by count) and 8 of long prompts: /health
    answers throughout (measured: at most one parse, about 50 ms here, between probes; before: 2.6-4 s)."""
    base, _ = open_server
    many = json.dumps({"model": engine.name, "messages": [{"role": "user", "content": "x"}] * 110_000}).encode()
    long_prompt = json.dumps({"model": engine.name, "prompt": "y" * (3 << 20), "max_tokens": 1}).encode()
    stop, latencies = threading.Event(), []

    def probe():
        while not stop.is_set():
            start = time.monotonic()
            assert http("GET", f"{base}/health", timeout=10)[0] == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.01)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    time.sleep(0.2)
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda b: http("POST", f"{base}/v1/chat/completions" if b is many else
                                                 f"{base}/v1/completions", b, timeout=60)[0], [many, long_prompt] * 8))
    stop.set()
    prober.join(timeout=10)
    assert statuses == [400] * 16
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"/health during 16 large bodies: {len(latencies)} probes, median {latencies[len(latencies) // 2] * 1e3:.0f} "
          f"ms, p99 {p99 * 1e3:.0f} ms, max {latencies[-1] * 1e3:.0f} ms")
    assert p99 < 0.5, latencies[-5:]


# -- TLS, and the rules `serve` starts by -----------------------------------------------------------

def self_signed(tmp_path):
    """A certificate for 127.0.0.1 that is its own CA, and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "moeshard test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.slow
def test_tls_serves_https_only(engine, tmp_path):
    cert, key = self_signed(tmp_path)
    with running(engine, ServeConfig(port=0, api_key=KEY, tls_cert=cert, tls_key=key)) as (base, port):
        trust = ssl.create_default_context(cafile=str(cert))
        status, _, text = http("GET", f"{base}/v1/models", headers=auth(), context=trust)
        assert status == 200 and json.loads(text)["data"][0]["id"] == engine.name
        with OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0,
                    http_client=openai.DefaultHttpxClient(verify=trust)) as client:  # closed: no idle TLS session
            assert client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=3, temperature=0).choices
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # a client that does not trust it
            http("GET", f"{base}/health", context=ssl.create_default_context())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # plain HTTP gets no HTTP answer
            sock.sendall(request_head("/health", {}, "GET"))
            reply, closed = read_reply(sock, timeout=5)
        assert closed and not reply.startswith(b"HTTP/")


@pytest.mark.parametrize("kwargs, message", [
    (dict(host="0.0.0.0"), "needs an API key"),
    (dict(host="192.168.1.20"), "needs an API key"),
    (dict(host="my-host.example"), "needs an API key"),
    (dict(api_key="k", insecure_no_api_key=True), "contradicts"),
    (dict(api_key=""), "non-empty"),
    (dict(api_key="two words"), "printable ASCII"),
    (dict(tls_cert="cert.pem"), "both --tls-cert and --tls-key"),
    (dict(max_body_bytes=0), "max_body_bytes"),
    (dict(header_timeout_s=0.0), "header_timeout_s"),
    (dict(body_timeout_s=float("nan")), "body_timeout_s"),
    (dict(max_connections=0), "max_connections"),
])
def test_serve_config_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(**kwargs)


def test_serve_config_accepts_loopback_a_key_or_an_explicit_choice(tmp_path):
    assert ServeConfig(host="localhost").api_key is None
    assert ServeConfig(host="::1").api_key is None
    assert ServeConfig(host="0.0.0.0", api_key=KEY).api_key == KEY
    assert ServeConfig(host="0.0.0.0", insecure_no_api_key=True).api_key is None
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ValueError, match="cannot load"):
        ServeConfig(tls_cert=garbage, tls_key=garbage)


def test_serve_refuses_a_public_address_without_a_key_before_the_model_loads(monkeypatch, capsys):
    def load_engine(args, extra_workers=()):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(commands, "load_engine", load_engine)
    monkeypatch.delenv("MOESHARD_API_KEY", raising=False)
    for argv, message in ((["--host", "0.0.0.0"], "needs an API key"),
                          (["--tls-cert", "c.pem"], "both --tls-cert and --tls-key"),
                          (["--header-timeout", "0"], "header_timeout_s"),
                          (["--api-key", KEY, "--insecure-no-api-key"], "contradicts")):
        assert main(["serve", "--quiet", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("moe-coordinator: error:") and message in err, err


def test_the_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    parser, _ = build_parser()
    monkeypatch.delenv("MOESHARD_API_KEY", raising=False)
    assert serve_config(parser.parse_args(["serve"])) == ServeConfig()  # the flags' defaults are the config's
    monkeypatch.setenv("MOESHARD_API_KEY", "from-env")
    assert serve_config(parser.parse_args(["serve", "--host", "0.0.0.0"])).api_key == "from-env"
    assert serve_config(parser.parse_args(["serve", "--api-key", "from-flag"])).api_key == "from-flag"


def test_serve_help_states_the_access_rules_and_limits(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--api-key KEY", "$MOESHARD_API_KEY", "--insecure-no-api-key", "--public-metrics",
                     "--tls-cert PEM", "--max-body-bytes N", "4 MiB", "--max-prompt-chars N",
                     "16 characters per token", "--header-timeout SECONDS", "--body-timeout SECONDS",
                     "--max-connections N", "401"):
        assert expected in text, expected


@pytest.mark.slow
def test_a_websocket_is_closed_before_anything_is_read(engine):
    from moeshard.coordinator.server import create_app

    app = create_app(engine, ServeConfig(api_key=KEY))
    sent: list = []

    async def receive():
        raise AssertionError("nothing may be read")

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/models", "headers": [], "query_string": b"", "root_path": ""}
    asyncio.run(app(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]
