"""The OpenAI-compatible server, driven by the official openai client against a real uvicorn server."""
import json
import socket
import threading
import time

import urllib.error
import urllib.request
import openai
import pytest
import uvicorn
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from moeshard.cli import main
from moeshard.coordinator.engine import Engine
from moeshard.coordinator.server import create_app
from moeshard.offload_core import OffloadConfig

PROMPT = "def add(a, b):"


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def served(tiny_tok_ckpt):
    engine = Engine.load(tiny_tok_ckpt, OffloadConfig(slots_per_layer=2, prefetch=1), progress=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    yield base, OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), engine
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()


def test_models_and_health(served):
    base, client, engine = served
    assert [m.id for m in client.models.list()] == [engine.name]
    assert json.loads(http("GET", f"{base}/health")[1])["status"] == "ok"


def test_greedy_completion_equals_cli_generate(served, tiny_tok_ckpt, capsys):
    base, client, engine = served
    reply = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=20, temperature=0)
    main(["generate", "--model", str(tiny_tok_ckpt), "--prompt", PROMPT, "--max-new-tokens", "20",
          "--temperature", "0", "--json", "--quiet"])
    cli = json.loads(capsys.readouterr().out)
    assert reply.choices[0].text == cli["text"]
    assert reply.usage.completion_tokens == len(cli["token_ids"])
    assert reply.usage.prompt_tokens == len(engine.encode_prompt(PROMPT))
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_streaming_completion_equals_non_streaming(served):
    base, client, engine = served
    full = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_chat_streaming_and_not(served):
    base, client, engine = served
    messages = [{"role": "user", "content": "class Point:"}]
    full = client.chat.completions.create(model=engine.name, messages=messages, max_tokens=16, temperature=0)
    assert full.choices[0].message.role == "assistant"
    parts = list(client.chat.completions.create(model=engine.name, messages=messages, max_tokens=16,
                                                temperature=0, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == full.choices[0].message.content
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens


def test_stop_strings_cut_the_text(served):
    base, client, engine = served
    full = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    if len(full) < 4:
        pytest.skip("generation too short to pick a stop string from")
    stop = full[2:4]
    cut = full[: full.find(stop)]
    reply = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=24, temperature=0,
                                         stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_two_concurrent_streams_complete_correctly(served):
    base, client, engine = served
    prompts = [PROMPT, "class Point:"]
    expected = [client.completions.create(model=engine.name, prompt=p, max_tokens=20, temperature=0).choices[0].text
                for p in prompts]
    results: list = [None, None]

    def consume(i):
        chunks = client.completions.create(model=engine.name, prompt=prompts[i], max_tokens=20, temperature=0,
                                           stream=True)
        results[i] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == expected


@pytest.mark.parametrize("body, status, code_or_text", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model_not_found"),
    (json.dumps({"model": "MODEL", "prompt": "x", "max_tokens": 100000}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"model": "MODEL", "prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": "MODEL"}).encode(), 400, "prompt"),
])
def test_errors_are_openai_shaped_and_server_keeps_serving(served, body, status, code_or_text):
    base, client, engine = served
    body = body.replace(b"MODEL", engine.name.encode())
    code, text = http("POST", f"{base}/v1/completions", body)
    assert code == status
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert code_or_text in (error["code"] or "") + error["message"]
    assert client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=2, temperature=0).choices


def test_openai_client_sees_errors(served):
    base, client, engine = served
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=100000)


def test_metrics_parse_and_move(served):
    base, client, engine = served

    def scrape():
        text = http("GET", f"{base}/metrics")[1]
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:  # summed over labels
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    before = scrape()
    client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=5, temperature=0)
    after = scrape()
    assert after["moeshard_tokens_generated_total"] >= before.get("moeshard_tokens_generated_total", 0) + 1
    assert after["moeshard_request_latency_seconds_count"] > before.get("moeshard_request_latency_seconds_count", 0)
    assert after["moeshard_expert_hits_total"] + after["moeshard_expert_misses_total"] > \
        before["moeshard_expert_hits_total"] + before["moeshard_expert_misses_total"]
    assert 0 <= after["moeshard_expert_cache_hit_rate"] <= 1
