"""The OpenAI surface that evaluation harnesses and common clients use, on the trained demo model behind an API key:
vLLM's /tokenize, /detokenize and /tokenizer_info; prompts as strings or token ids, several per request; n choices
and seeds; logit_bias; log-probabilities (generated and echoed prompt tokens) equal to transformers' own
log-softmax on the same ids, alone and batched, streamed and not; and every parameter refused by name.

Clients are the official openai client, and urllib where it has no method (the tokenizer endpoints).
"""
from __future__ import annotations

import contextlib
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM

from moeshard.coordinator.batching import BatchConfig
from moeshard.coordinator.engine import Engine
from moeshard.coordinator.http_security import ServeConfig
from moeshard.coordinator.request_body import LIST_LIMITS, BodyError, load
from moeshard.coordinator.server import build_server
from moeshard.offload_core.demo import demo_model_path

from .workers import run_server_in_thread

KEY = "surface-key-9d2e"
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
LONG = ("import os\nimport sys\n\n\ndef main(argv=None):\n    parser = argparse.ArgumentParser()\n"
        "    parser.add_argument('--verbose', action='store_true')\n")  # more than one 32-token prefill chunk
TOLERANCE = 1e-4  # fp32, batched or alone, against transformers' model run whole


@contextlib.contextmanager
def serving(engine: Engine, batch: BatchConfig):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(engine, ServeConfig(port=port, api_key=KEY), log_level="warning", batch=batch)
    thread = run_server_in_thread(server, sock, 60)
    base = f"http://127.0.0.1:{port}"
    try:
        yield base, OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine(demo_engine):
    return demo_engine


@pytest.fixture(scope="module")
def served(engine):
    with serving(engine, BatchConfig(max_batch=8, max_queue=16, step_tokens=32)) as s:
        yield s


@pytest.fixture(scope="module")
def reference():
    """transformers' own model on the same checkpoint, in fp32: log-softmax of its logits at every position."""
    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:  # [len(ids), V]
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


@pytest.fixture(scope="module")
def ids_of(engine):
    """Token text -> id over the vocabulary, for texts that only one token has."""
    seen: dict[str, list[int]] = {}
    for i in range(engine.vocab_size):
        seen.setdefault(engine.tokenizer.decode([i]), []).append(i)
    unique = {text: ids[0] for text, ids in seen.items() if len(ids) == 1}

    def ids(tokens: list[str]) -> list[int]:
        assert all(t in unique for t in tokens), "a reported token's text names more than one id"
        return [unique[t] for t in tokens]

    return ids


def call(base: str, method: str, path: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{base}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def worst_gap(entries: list[tuple[int, float, dict[int, float]]], rows: torch.Tensor, n: int) -> float:
    """The largest difference between the reported (token, logprob, {token: logprob}) and the reference rows, the
    reported N likeliest included: they must be the reference's N likeliest."""
    gap = 0.0
    for (token, logprob, top), row in zip(entries, rows, strict=True):
        gap = max(gap, abs(logprob - float(row[token])))
        for t, v in top.items():
            gap = max(gap, abs(v - float(row[t])))
        likeliest = torch.tensor(sorted(top.values(), reverse=True)[:n])
        gap = max(gap, float((likeliest - torch.topk(row, n).values).abs().max()))
    return gap


def close(a, b) -> bool:
    """Two lists, or {token: logprob} dicts, of log-probabilities (None where there is none) within TOLERANCE."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, dict) or isinstance(b, dict):
        return a.keys() == b.keys() and close(list(a.values()), list(b.values()))
    return len(a) == len(b) and all((x is None) == (y is None) and (x is None or abs(x - y) <= TOLERANCE)
                                    for x, y in zip(a, b))


# -- the tokenizer ------------------------------------------------------------------------------

def test_tokenize_detokenize_and_tokenizer_info_are_vllm_s(served, engine):
    base, _ = served
    tokenizer = engine.tokenizer
    status, reply = call(base, "POST", "/tokenize", {"model": engine.name, "prompt": PROMPT, "return_token_strs": True})
    assert status == 200 and reply["tokens"] == engine.encode_prompt(PROMPT) and reply["count"] == len(reply["tokens"])
    assert reply["max_model_len"] == engine.context_length
    assert reply["token_strs"] == tokenizer.convert_ids_to_tokens(reply["tokens"])
    plain = call(base, "POST", "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})[1]
    assert plain["tokens"] == tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert plain["token_strs"] is None
    messages = [{"role": "user", "content": "class Point:"}]
    chat = call(base, "POST", "/tokenize", {"messages": messages})[1]
    assert chat["tokens"] == engine.encode_chat(messages)  # what /v1/chat/completions prefills
    status, text = call(base, "POST", "/detokenize", {"model": engine.name, "tokens": reply["tokens"]})
    assert status == 200 and text["prompt"] == tokenizer.decode(reply["tokens"])
    status, info = call(base, "GET", "/tokenizer_info")
    assert status == 200 and info["tokenizer_class"] == type(tokenizer).__name__
    assert info["eos_token"] == tokenizer.eos_token and "name_or_path" not in info
    for method, path, body in (("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [5]}),
                               ("GET", "/tokenizer_info", None)):
        assert call(base, method, path, body, key=None)[0] == 401  # behind the API key like the rest
        assert call(base, method, path, body, key="wrong")[0] == 401


@pytest.mark.parametrize("path, body, param", [
    ("/detokenize", {"tokens": [5, 4096]}, "tokens"), ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [5, True]}, "tokens.1"), ("/tokenize", {"prompt": "x", "messages": []}, "prompt"),
    ("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "x", "chat_template": "{{ x }}"}, "chat_template"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_special_tokens": True}, "add_special_tokens"),
    ("/tokenize", {"model": "other", "prompt": "x"}, "model"),
])
def test_tokenizer_endpoints_refuse_what_they_cannot_take(served, path, body, param):
    status, reply = call(served[0], "POST", path, body)
    assert status in (400, 404) and reply["error"]["param"] == param, reply


# -- prompts, choices, seeds, logit_bias ---------------------------------------------------------

def test_prompts_as_text_or_token_ids_get_one_choice_each_in_order(served, engine):
    base, client = served
    texts = [PROMPT, "class Point:\n"]
    ids = [engine.encode_prompt(t) for t in texts]
    ask = dict(model=engine.name, max_tokens=4, temperature=0)
    alone = [client.completions.create(prompt=t, **ask) for t in texts]
    for prompt in (texts, ids):
        reply = client.completions.create(prompt=prompt, **ask)
        assert [c.index for c in reply.choices] == [0, 1]
        assert [c.text for c in reply.choices] == [a.choices[0].text for a in alone]
        assert reply.usage.prompt_tokens == sum(map(len, ids))
        assert reply.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    one = client.completions.create(prompt=ids[1], **ask)  # a single list of ids is one prompt
    assert [c.text for c in one.choices] == [alone[1].choices[0].text]
    echoed = client.completions.create(prompt=ids[1], echo=True, **ask)
    assert echoed.choices[0].text == texts[1] + alone[1].choices[0].text  # token ids echo as their text


def test_n_choices_differ_by_seed_and_repeat_with_it(served, engine):
    base, client = served
    ask = dict(model=engine.name, prompt=["def main():\n", "class Node:\n"], max_tokens=5, temperature=1.0, seed=11)
    reply = client.completions.create(n=2, **ask)
    assert [c.index for c in reply.choices] == list(range(4))  # prompt i, choice j at i * n + j
    texts = [c.text for c in reply.choices]
    assert texts[0] != texts[1] and texts[2] != texts[3], "two seeded choices were the same"
    assert [c.text for c in client.completions.create(n=2, **ask).choices] == texts  # the same seed, the same text
    single = client.completions.create(**{**ask, "seed": 12, "prompt": ask["prompt"][1]})
    assert single.choices[0].text == texts[3]  # choice j samples with seed + j
    messages = [{"role": "user", "content": "import os"}]
    chat = client.chat.completions.create(model=engine.name, messages=messages, max_tokens=5, n=2, seed=5)
    assert [c.index for c in chat.choices] == [0, 1]
    one = client.chat.completions.create(model=engine.name, messages=messages, max_tokens=5, seed=6)
    assert one.choices[0].message.content == chat.choices[1].message.content


def test_logit_bias_steers_the_choice_not_the_reported_logprobs(served, engine, reference, ids_of):
    base, client = served
    ids = engine.encode_prompt(PROMPT)
    ask = dict(model=engine.name, prompt=ids, max_tokens=4, temperature=0, logprobs=1)
    plain = client.completions.create(**ask).choices[0].logprobs
    forced = engine.encode_prompt("print", add_special_tokens=False)[0]
    steered = client.completions.create(**ask, logit_bias={str(forced): 100}).choices[0].logprobs
    assert steered.tokens == [engine.tokenizer.decode([forced])] * 4 != plain.tokens
    first = ids_of(plain.tokens[:1])[0]
    banned = client.completions.create(**ask, logit_bias={str(first): -100}).choices[0].logprobs
    assert banned.tokens[0] != plain.tokens[0]
    row = reference(ids)[-1]  # the first token's distribution, as the model gives it: before any bias
    assert abs(plain.token_logprobs[0] - float(row[first])) <= TOLERANCE and first == int(row.argmax())
    assert abs(steered.token_logprobs[0] - float(row[forced])) <= TOLERANCE
    second = ids_of(banned.tokens[:1])[0]
    assert abs(banned.token_logprobs[0] - float(row[second])) <= TOLERANCE


# -- log-probabilities -------------------------------------------------------------------------

@pytest.mark.slow  # ~2 s: the same requests alone and among six others
def test_logprobs_equal_transformers_alone_and_batched(served, engine, reference, ids_of):
    """Greedy and sampled completions, chat, a scored prompt: each token's log-probability and the likeliest N equal
    transformers' log-softmax on the same ids within 1e-4 (fp32), whether the request runs alone or among others;
    a sampled token's is the model's own, not the temperature's."""
    base, client = served
    prompt = engine.encode_prompt(LONG)
    asks = {"greedy": dict(prompt=prompt, max_tokens=10, temperature=0, logprobs=5),
            "sampled": dict(prompt=PROMPT, max_tokens=10, temperature=0.7, seed=3, logprobs=3),
            "scored": dict(prompt=prompt, max_tokens=0, echo=True, logprobs=2)}
    messages = [{"role": "user", "content": "def add(a, b):"}]

    def completion(name):
        return client.completions.create(model=engine.name, **asks[name]).choices[0]

    def chat():
        return client.chat.completions.create(model=engine.name, messages=messages, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=4).choices[0]

    def check(greedy, sampled, chatted, scored):
        ids = ids_of(greedy.logprobs.tokens)
        rows = reference(prompt + ids)[len(prompt) - 1:-1]
        assert ids == rows.argmax(-1).tolist()  # greedy: the reference's own choice
        tops = [{ids_of([t])[0]: v for t, v in top.items()} for top in greedy.logprobs.top_logprobs]
        assert all(len(top) == 5 for top in tops)  # the chosen token is the likeliest: nothing added
        assert worst_gap(list(zip(ids, greedy.logprobs.token_logprobs, tops)), rows, 5) <= TOLERANCE
        sampled_ids = ids_of(sampled.logprobs.tokens)
        prompt_ids = engine.encode_prompt(PROMPT)
        rows = reference(prompt_ids + sampled_ids)[len(prompt_ids) - 1:-1]
        tops = [{ids_of([t])[0]: v for t, v in top.items()} for top in sampled.logprobs.top_logprobs]
        assert any(len(top) == 4 for top in tops), "every sampled token was among the 3 likeliest: pick another seed"
        assert worst_gap(list(zip(sampled_ids, sampled.logprobs.token_logprobs, tops)), rows, 3) <= TOLERANCE
        content = chatted.logprobs.content
        chat_ids = ids_of([c.token for c in content])
        assert chatted.message.content == engine.tokenizer.decode(chat_ids, skip_special_tokens=True)
        chat_prompt = engine.encode_chat(messages)
        rows = reference(chat_prompt + chat_ids)[len(chat_prompt) - 1:-1]
        entries = [(i, c.logprob, {ids_of([t.token])[0]: t.logprob for t in c.top_logprobs})
                   for i, c in zip(chat_ids, content)]
        assert all(len(c.top_logprobs) == 4 and bytes(c.bytes) == c.token.encode() for c in content)
        assert worst_gap(entries, rows, 4) <= TOLERANCE
        rows = reference(prompt)[:-1]
        tops = [{ids_of([t])[0]: v for t, v in top.items()} for top in scored.logprobs.top_logprobs[1:]]
        assert scored.logprobs.token_logprobs[0] is None
        assert worst_gap(list(zip(prompt[1:], scored.logprobs.token_logprobs[1:], tops)), rows, 2) <= TOLERANCE

    alone = (completion("greedy"), completion("sampled"), chat(), completion("scored"))
    check(*alone)
    with ThreadPoolExecutor(12) as pool:
        others = [pool.submit(client.completions.create, model=engine.name, prompt=p, max_tokens=20, temperature=0.9)
                  for p in ("x = 1", "class A:\n", "import re\n", "    return", "def f(x):", "while True:")]
        together = [pool.submit(completion, "greedy"), pool.submit(completion, "sampled"), pool.submit(chat),
                    pool.submit(completion, "scored")]
        together = [f.result() for f in together]
        assert all(o.result().choices for o in others)
    check(*together)
    assert [t.logprobs.tokens for t in together[:2]] == [a.logprobs.tokens for a in alone[:2]]


def test_echo_scores_the_prompt_as_evaluation_harnesses_ask(served, engine, reference):
    """lm-evaluation-harness's loglikelihood request: several prompts as token ids, echo, logprobs 1, max_tokens 1;
    and max_tokens 0, which scores without generating. A prompt token's log-probability (null for the first) is
    transformers' log-softmax at the position before it, across prefill chunks."""
    base, client = served
    prompts = [engine.encode_prompt(LONG), engine.encode_prompt(PROMPT)]
    assert len(prompts[0]) > 32, "the first prompt must be prefilled in several chunks"
    for max_tokens in (1, 0):
        reply = client.completions.create(model=engine.name, prompt=prompts, echo=True, logprobs=1,
                                          max_tokens=max_tokens, temperature=0)
        assert reply.usage.completion_tokens == max_tokens * len(prompts)
        for choice, ids in zip(reply.choices, prompts):
            lp = choice.logprobs
            assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            assert lp.tokens[:len(ids)] == [engine.tokenizer.decode([i]) for i in ids]
            rows = reference(ids)[:-1]
            gaps = [abs(v - float(rows[k, ids[k + 1]])) for k, v in enumerate(lp.token_logprobs[1:len(ids)])]
            assert max(gaps) <= TOLERANCE
            greedy = [max(top.values()) == v for top, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:])]
            assert greedy == [int(rows[k].argmax()) == ids[k + 1] for k in range(len(ids) - 1)] + [True] * max_tokens
            text, ends = choice.text, lp.text_offset[1:] + [len(choice.text)]
            assert text.startswith(engine.tokenizer.decode(ids, skip_special_tokens=True))
            visible = [engine.tokenizer.decode([i], skip_special_tokens=True) for i in ids]
            assert [text[a:b] for a, b in zip(lp.text_offset, ends)][:len(ids)] == visible


def test_echo_of_a_text_prompt_puts_new_tokens_after_it(served, engine):
    base, client = served
    reply = client.completions.create(model=engine.name, prompt=PROMPT, echo=True, logprobs=0, max_tokens=3,
                                      temperature=0).choices[0]
    prompt_tokens = len(engine.encode_prompt(PROMPT))
    assert reply.text.startswith(PROMPT) and reply.logprobs.text_offset[prompt_tokens] == len(PROMPT)
    assert all(len(top) == 1 for top in reply.logprobs.top_logprobs[1:])  # N = 0: the token itself only


def test_streamed_logprobs_add_up_to_the_whole_reply(served, engine):
    base, client = served
    ask = dict(model=engine.name, prompt=[PROMPT, "class Point:\n"], max_tokens=12, temperature=0.8, seed=2,
               logprobs=2, n=2, echo=True)
    whole = client.completions.create(**ask)
    parts: dict[int, dict] = {}
    for chunk in client.completions.create(**ask, stream=True):
        for c in chunk.choices:
            part = parts.setdefault(c.index, {"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [],
                                              "text_offset": []})
            part["text"] += c.text
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                part[key] += getattr(c.logprobs, key) if c.logprobs is not None else []
    assert sorted(parts) == [0, 1, 2, 3]
    for c in whole.choices:  # the same text and tokens; values as close as any two batches give them
        part = parts[c.index]
        assert (part["text"], part["tokens"], part["text_offset"]) == (c.text, c.logprobs.tokens, c.logprobs.text_offset)
        assert close(part["token_logprobs"], c.logprobs.token_logprobs)
        assert all(close(a, b) for a, b in zip(part["top_logprobs"], c.logprobs.top_logprobs, strict=True))
    messages = [{"role": "user", "content": "import os"}]
    chat = dict(model=engine.name, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**chat).choices[0]
    streamed = [e for chunk in client.chat.completions.create(**chat, stream=True) for c in chunk.choices
                if c.logprobs is not None for e in c.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole.logprobs.content]
    assert close([e.logprob for e in streamed], [e.logprob for e in whole.logprobs.content])
    assert all([t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]
               for a, b in zip(streamed, whole.logprobs.content))
    assert len(streamed) == client.chat.completions.create(**chat).usage.completion_tokens


# -- refused by name ---------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint, fields, param", [
    ("completions", {"logprobs": 21}, "logprobs"), ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"suffix": "return x"}, "suffix"), ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"prompt": []}, "prompt"), ("completions", {"prompt": [5, "x"]}, "prompt"),
    ("completions", {"prompt": [[5], []]}, "prompt"), ("completions", {"prompt": [5, True]}, "prompt"),
    ("completions", {"prompt": [[5, 4096]]}, "prompt"), ("completions", {"prompt": [5] * 600}, "max_tokens"),
    ("completions", {"n": 129}, "n"), ("completions", {"n": 25}, "n"), ("completions", {"prompt": ["x"] * 25}, "prompt"),
    ("completions", {"logit_bias": {"4096": 1}}, "logit_bias"), ("completions", {"logit_bias": {"05": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": 100.5}}, "logit_bias.5"), ("completions", {"presence_penalty": 1}, "presence_penalty"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"), ("chat/completions", {"logprobs": True, "top_logprobs": 21},
                                                               "top_logprobs"),
    ("chat/completions", {"logprobs": 1}, "logprobs"), ("chat/completions", {"echo": True}, "echo"),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_what_is_not_taken_is_refused_by_name(served, engine, endpoint, fields, param):
    body = ({"model": engine.name, "prompt": "x", "max_tokens": 2} if endpoint == "completions" else
            {"model": engine.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    status, reply = call(served[0], "POST", f"/v1/{endpoint}", {**body, **fields})
    assert status == 400 and reply["error"]["param"] == param and param.split(".")[0] in reply["error"]["message"], reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}


def test_token_ids_are_counted_across_prompts_before_validation():
    limit = LIST_LIMITS["prompt"]
    assert load(json.dumps({"prompt": [[5] * (limit // 2)] * 2}).encode())["prompt"]
    with pytest.raises(BodyError, match="token ids in all") as refused:
        load(json.dumps({"prompt": [[5] * (limit // 2), [5] * (limit // 2 + 1)]}).encode())
    assert refused.value.param == "prompt"


@pytest.mark.slow  # ~2 s: a server of its own
def test_a_request_holds_one_place_per_sequence(engine):
    with serving(engine, BatchConfig(max_batch=1, max_queue=1, step_tokens=32)) as (base, client):
        stream = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=200, temperature=0,
                                           stream=True)
        next(iter(stream))  # one of the two places is taken
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=engine.name, prompt=["x", "y"], max_tokens=2)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "x"}], n=2,
                                           max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="--max-batch"):  # never fits: not worth a retry
            client.completions.create(model=engine.name, prompt=["x", "y", "z"], max_tokens=2)
        stream.close()
        reply = client.completions.create(model=engine.name, prompt=["x", "y"], max_tokens=2, temperature=0)
        assert [c.index for c in reply.choices] == [0, 1]
