"""`serve` under concurrency, through the official openai client and raw sockets, on the trained demo model:
requests served together get what they get alone; a full queue answers 429 with Retry-After; a client that
goes away (streaming or not) leaves the batch; a barrage leaves the server serving with nothing running."""
from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from moeshard.coordinator.batching import BatchConfig
from moeshard.coordinator.engine import Engine
from moeshard.coordinator.http_security import ServeConfig
from moeshard.coordinator.server import build_server

from .workers import run_server_in_thread

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n",
           "for i in range(", "x = 1", "    return", "class Node:\n"]


@pytest.fixture(scope="module")
def engine(demo_engine):
    return demo_engine


@contextlib.contextmanager
def serving(engine: Engine, batch: BatchConfig, max_tokens: int | None = None):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(engine, ServeConfig(port=port, max_connections=512), log_level="warning", batch=batch,
                          max_tokens=max_tokens)
    thread = run_server_in_thread(server, sock, 60)
    base = f"http://127.0.0.1:{port}"
    try:
        yield base, OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(engine):
    with serving(engine, BatchConfig(max_batch=8, max_queue=64, step_tokens=32)) as s:
        yield s


def metrics(base: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def outcome(m: dict, status: str) -> float:
    return sum(v for (name, labels), v in m.items() if name == "moeshard_requests_total" and ("status", status) in labels)


def gauge(m: dict, name: str) -> float:
    return m[(name, ())]


def wait_idle(base: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(base)
        if gauge(m, "moeshard_batch_active") == 0 and gauge(m, "moeshard_requests_in_flight") == 0:
            return m
        assert time.monotonic() < deadline, "generation still running"
        time.sleep(0.1)


def ask(client: OpenAI, name: str, spec: dict) -> tuple[str, int, str]:
    """One request as `spec` says (kind, prompt, max_tokens, stream, stop); (text, completion tokens, finish)."""
    common = dict(model=name, max_tokens=spec["max_tokens"], temperature=0, stop=spec.get("stop"))
    if spec["kind"] == "chat":
        call = client.chat.completions.create
        common["messages"] = [{"role": "user", "content": spec["prompt"]}]
    else:
        call = client.completions.create
        common["prompt"] = spec["prompt"]
    if not spec["stream"]:
        reply = call(**common)
        choice = reply.choices[0]
        text = choice.message.content if spec["kind"] == "chat" else choice.text
        return text, reply.usage.completion_tokens, choice.finish_reason
    text, usage, finish = "", None, None
    for chunk in call(**common, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += (choice.delta.content or "") if spec["kind"] == "chat" else choice.text
            finish = choice.finish_reason or finish
    return text, usage, finish


SPECS = [dict(kind=k, prompt=p, max_tokens=n, stream=s, stop=stop)
         for k, p, n, s, stop in [("text", PROMPTS[0], 24, False, None), ("text", PROMPTS[1], 12, True, None),
                                  ("chat", PROMPTS[2], 30, False, ["\n"]), ("text", PROMPTS[3], 18, True, [")"]),
                                  ("chat", PROMPTS[4], 9, True, None), ("text", PROMPTS[5], 40, False, ["def"]),
                                  ("text", PROMPTS[0], 16, True, ["\n\n"]), ("chat", PROMPTS[1], 21, False, None)]]


@pytest.mark.slow
def test_concurrent_requests_get_what_they_get_alone(served, engine):
    """Completions and chat, streaming or not, with stops and different lengths, eight at once, while two more
    streams are abandoned mid-way: each reply equals the same request's reply alone."""
    base, client = served
    alone = [ask(client, engine.name, spec) for spec in SPECS]
    before = metrics(base)

    def abandon(prompt: str) -> None:
        stream = client.completions.create(model=engine.name, prompt=prompt, max_tokens=200, temperature=0,
                                           stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                stream.close()
                return

    with ThreadPoolExecutor(10) as pool:
        quitters = [pool.submit(abandon, p) for p in PROMPTS[:2]]
        together = list(pool.map(lambda s: ask(client, engine.name, s), SPECS))
        for q in quitters:
            q.result()
    assert together == alone
    after = wait_idle(base)
    assert outcome(after, "ok") - outcome(before, "ok") == len(SPECS)
    assert outcome(after, "cancelled") - outcome(before, "cancelled") == 2
    steps = {labels: v for (name, labels), v in after.items() if name == "moeshard_batch_size_bucket"}
    assert steps[(("le", "2.0"),)] < steps[(("le", "+Inf"),)], "no step decoded more than two sequences"


def test_a_client_that_leaves_a_non_streaming_request_stops_its_generation(served, engine):
    base, _ = served
    port = int(base.rsplit(":", 1)[1])
    before = metrics(base)
    body = json.dumps({"model": engine.name, "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while gauge(metrics(base), "moeshard_batch_active") == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
    left = time.monotonic()
    after = wait_idle(base, timeout_s=30)
    assert time.monotonic() - left < 10, "the abandoned request kept generating"
    assert outcome(after, "cancelled") - outcome(before, "cancelled") == 1
    tokens = after[("moeshard_tokens_generated_total", ())] - before[("moeshard_tokens_generated_total", ())]
    assert tokens == 0  # cancelled requests' tokens were never delivered


def test_a_full_queue_answers_429_with_retry_after(engine):
    with serving(engine, BatchConfig(max_batch=1, max_queue=0, step_tokens=32), max_tokens=300) as (base, client):
        stream = client.completions.create(model=engine.name, prompt=PROMPTS[0], max_tokens=300, temperature=0,
                                           stream=True)
        next(iter(stream))  # the only place in the batch is taken
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model=engine.name, prompt=PROMPTS[1], max_tokens=4)
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert refused.value.body["type"] == "server_overloaded" and "--max-batch" in refused.value.body["message"]
        with pytest.raises(openai.BadRequestError, match="--max-tokens"):
            client.completions.create(model=engine.name, prompt=PROMPTS[1], max_tokens=301)
        stream.close()
        m = wait_idle(base)
        assert m[("moeshard_request_rejections_total", (("reason", "overloaded"),))] == 1
        assert client.completions.create(model=engine.name, prompt=PROMPTS[1], max_tokens=4).usage.completion_tokens


@pytest.mark.slow
def test_a_barrage_of_200_mixed_requests_leaves_the_server_serving(engine):
    """200 concurrent requests: valid ones (some streamed, some abandoned), malformed JSON, bad parameters and a
    wrong model. Every request is counted by outcome, nothing errors, nothing keeps running, and the server then
    answers as before."""
    with serving(engine, BatchConfig(max_batch=8, max_queue=32, step_tokens=32)) as (base, client):
        port = int(base.rsplit(":", 1)[1])
        reference = client.completions.create(model=engine.name, prompt=PROMPTS[0], max_tokens=12, temperature=0)

        def raw(body: bytes) -> int:
            req = urllib.request.Request(f"{base}/v1/completions", data=body, method="POST",
                                         headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as reply:
                    reply.read()
                    return reply.status
            except urllib.error.HTTPError as err:
                return err.code

        def one(i: int):
            kind = i % 5
            if kind == 0:
                return raw(b'{"model": "' + engine.name.encode() + b'", "prompt": ')  # malformed JSON
            if kind == 1:
                return raw(json.dumps({"model": engine.name, "prompt": "x", "max_tokens": -3}).encode())
            if kind == 2:  # abandoned stream
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    body = json.dumps({"model": engine.name, "prompt": PROMPTS[i % 6], "max_tokens": 100,
                                       "stream": True}).encode()
                    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
                    sock.recv(256)
                return "abandoned"
            body = {"model": engine.name if kind == 3 else "other", "prompt": PROMPTS[i % 6], "max_tokens": 6,
                    "temperature": 0, "stream": i % 2 == 0}
            return raw(json.dumps(body).encode())

        with ThreadPoolExecutor(64) as pool:
            statuses = list(pool.map(one, range(200)))
        m = wait_idle(base, timeout_s=120)
        counted = sum(outcome(m, s) for s in ("ok", "cancelled", "error", "rejected"))
        assert outcome(m, "error") == 0
        assert counted == 200 + 1  # + the reference request
        assert all(s in (200, 400, 404, 429, "abandoned") for s in statuses), statuses
        assert statuses.count(400) == 80 and statuses.count(404) == 40
        again = client.completions.create(model=engine.name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
        assert again.choices[0].text == reference.choices[0].text
