"""Prefix reuse on the trained demo model (fp32, experts offloaded): a prompt that starts with KV pages another request
computed (a shared system prompt; a conversation that grows by the model's own answer) reuses them, reports how many
tokens it reused, and decodes the tokens it decodes without the prefix cache, which are transformers' `generate`'s;
a prompt being scored never reuses (it needs every position's hidden states); usage's cached_tokens through the
official openai client, streamed and not; the bench's shared-prefix scenario."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest
from openai import OpenAI

from moeshard.coordinator.batching import BatchConfig, Batcher
from moeshard.coordinator.http_security import ServeConfig
from moeshard.coordinator.sampling import SamplingParams
from moeshard.coordinator.server import build_server
from moeshard.offload_core.demo import demo_model_path

from .test_batching import alone
from .workers import run_server_in_thread

PAGE = 32  # BatchConfig's page_size: reuse is by whole pages


@pytest.fixture(scope="module")
def engine(demo_engine):
    return demo_engine


@pytest.fixture(scope="module")
def heldout(engine) -> list[int]:
    return engine.encode_prompt((demo_model_path() / "heldout.txt").read_text(encoding="utf-8")[:6000])


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


def run(engine, cfg: BatchConfig, prompts: list[list[int]], params: SamplingParams) -> list:
    """The prompts one after another on a fresh batcher (so each finds the pages of those before it)."""
    async def go():
        b = Batcher(engine, cfg)
        b.start()
        try:
            return [await b.generate(p, params) for p in prompts]
        finally:
            b.close()

    return asyncio.run(go())


@pytest.mark.slow  # four requests on two batchers: ~2 s
def test_a_shared_prefix_is_reused_and_decodes_the_same_tokens(engine, heldout):
    system = heldout[:100]  # 3 whole pages and 4 tokens
    first, second = system + heldout[300:310], system + heldout[400:413]
    reused = run(engine, BatchConfig(step_tokens=32), [first, second], greedy(10))
    assert [r.stats["cached_tokens"] for r in reused] == [0, 96]
    computed = run(engine, BatchConfig(step_tokens=32, prefix_cache=False), [first, second], greedy(10))
    assert [r.stats["cached_tokens"] for r in computed] == [0, 0]
    assert [r.token_ids for r in computed] == [r.token_ids for r in reused]
    assert len(set(map(tuple, (r.token_ids for r in reused)))) == 2, "the two prompts must decode differently"


@pytest.mark.slow  # two turns and transformers' generate: ~2 s
def test_a_growing_conversation_reuses_the_answer_too(engine, heldout):
    """The next turn's prompt is the last prompt, the model's answer and more: the answer's pages are reused too (all
    but the last answer token's, whose keys were never computed); its tokens are transformers' `generate`'s."""
    turn, params = heldout[:40], greedy(30)

    async def go():
        b = Batcher(engine, BatchConfig(step_tokens=32))
        b.start()
        try:
            first = await b.generate(turn, params)
            follow_up = turn + first.token_ids + heldout[500:520]
            return first, follow_up, await b.generate(follow_up, params)
        finally:
            b.close()

    first, follow_up, second = asyncio.run(go())
    # Keys exist for the prompt and every answer token but the last; transformers 5.24 does not offer the pages its
    # last step completed (continuous_api.py marks them after update_and_check_completion set FINISHED, and
    # cache.mark_complete_blocks returns on FINISHED): those of the tokens before the last step's are reused.
    before_last_step = len(turn) + len(first.token_ids) - 2
    assert second.stats["cached_tokens"] == before_last_step // PAGE * PAGE > len(turn)
    assert second.token_ids == alone(engine, follow_up, params)


@contextlib.contextmanager
def serving(engine, batch: BatchConfig):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(engine, ServeConfig(port=port), log_level="warning", batch=batch)
    thread = run_server_in_thread(server, sock, 60)
    try:
        yield OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_usage_reports_cached_tokens_streamed_and_not(engine, heldout):
    system = engine.tokenizer.decode(heldout[:90])
    with serving(engine, BatchConfig(step_tokens=64)) as client:
        def chat(question: str, **kwargs):
            return client.chat.completions.create(
                model=engine.name, max_tokens=4, temperature=0,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": question}], **kwargs)

        cold = chat("def first():")
        warm = chat("class Second:")
        stream = list(chat("import third", stream=True, stream_options={"include_usage": True}))
        two = chat("def fourth():", n=2)  # one prompt, counted once
        # echo with logprobs needs the hidden states of every prompt position: it computes its whole prompt
        scored = client.completions.create(model=engine.name, prompt=system, max_tokens=0, echo=True, logprobs=0)
    prompt_tokens = len(engine.encode_chat([{"role": "system", "content": system},
                                            {"role": "user", "content": "class Second:"}]))
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % PAGE == 0 and cached < prompt_tokens
    assert stream[-1].choices == [] and stream[-1].usage.prompt_tokens_details.cached_tokens == cached
    assert len(two.choices) == 2 and two.usage.prompt_tokens_details.cached_tokens == cached
    assert scored.usage.prompt_tokens_details.cached_tokens == 0
    logprobs = scored.choices[0].logprobs.token_logprobs
    assert len(logprobs) == scored.usage.prompt_tokens > PAGE and logprobs[0] is None and None not in logprobs[1:]


@pytest.mark.slow  # two servers on a small benchmark model
def test_the_shared_prefix_bench_reuses_the_system_prompt(tmp_path, capsys):
    from moeshard.cli import main

    out = tmp_path / "prefix.json"
    assert main(["bench", "--concurrency", "1,2", "--shared-prefix", "96", "--systems", "resident", "--hidden", "64",
                 "--intermediate", "128", "--layers", "2", "--tokens", "4", "--prompt-tokens", "8", "--repeats", "1",
                 "--workdir", str(tmp_path / "work"), "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["scenario"] == "shared-prefix" and report["levels"] == [1, 2]
    modes = report["systems"]["resident"]
    for level in ("1", "2"):
        reused, computed = modes["prefix cache"][level], modes["no prefix cache"][level]
        assert reused["prompt_tokens"] == computed["prompt_tokens"] > 96
        assert reused["cached_tokens"] == 96 and computed["cached_tokens"] == 0  # the system prompt's 3 pages
        # what the cache saves is exactly the prompt tokens it reused
        assert computed["computed_tokens_per_request"] - reused["computed_tokens_per_request"] == 96
    assert set(report["targets"]) == {f"resident_x{n}_ttft_p50_without_vs_with_prefix_cache" for n in (1, 2)}
    assert "no prefix cache" in capsys.readouterr().out


def test_no_prefix_cache_recomputes_every_prompt(engine, heldout):
    from moeshard.coordinator.cli import build_parser
    from moeshard.coordinator.commands import batch_config

    parser, _ = build_parser()
    assert batch_config(parser.parse_args(["serve"])).prefix_cache is True
    off = batch_config(parser.parse_args(["serve", "--no-prefix-cache"]))
    assert off.prefix_cache is False
    system = engine.tokenizer.decode(heldout[:90])
    with serving(engine, BatchConfig(step_tokens=64, prefix_cache=False)) as client:
        replies = [client.chat.completions.create(
            model=engine.name, max_tokens=2, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": q}]) for q in ("a", "b")]
    assert [r.usage.prompt_tokens_details.cached_tokens for r in replies] == [0, 0]
