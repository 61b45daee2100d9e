"""Structured output on the trained demo model behind the official openai client: response_format json_schema and
json_object constrain decoding (llguidance), so that the reply parses and validates even though the model was trained
on Python, not JSON; alone, sampled, streamed, as n choices, and among unconstrained requests that stay as they were.
"""
from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from moeshard.coordinator.batching import BatchConfig
from moeshard.coordinator.grammar import GrammarError, Grammars

from .test_openai_surface import PROMPT, serving

# Small enough that even this model closes it: an enum, a short lower-case name, a bounded integer.
SCHEMA = {"type": "object",
          "properties": {"lang": {"enum": ["python", "c", "rust"]},
                         "name": {"type": "string", "pattern": "^[a-z_]{1,8}$"},
                         "lines": {"type": "integer", "minimum": 1, "maximum": 999}},
          "required": ["lang", "name", "lines"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "module", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "def describe(module):\n"}]


@pytest.fixture(scope="module")
def served(demo_engine):
    with serving(demo_engine, BatchConfig(max_batch=8, max_queue=16, step_tokens=64)) as (base, client):
        yield demo_engine, client


def ask(served, **kwargs):
    engine, client = served
    return client.chat.completions.create(model=engine.name, **{"messages": MESSAGES, "max_tokens": 60, **kwargs})


def test_a_json_schema_reply_validates(served):
    plain = ask(served, temperature=0).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(plain)  # what this model writes unconstrained: Python, not JSON
    greedy = ask(served, temperature=0, response_format=FORMAT).choices[0]
    assert greedy.finish_reason == "stop"
    jsonschema.validate(json.loads(greedy.message.content), SCHEMA)


@pytest.mark.slow  # ~1.5 s
def test_sampled_and_streamed_json_schema_replies_validate(served):
    engine, client = served
    greedy = ask(served, temperature=0, response_format=FORMAT).choices[0]
    sampled = ask(served, temperature=1.0, seed=7, n=2, response_format=FORMAT).choices
    for choice in sampled:  # each choice its own grammar state
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    streamed = [chunk for chunk in client.chat.completions.create(
        model=engine.name, messages=MESSAGES, max_tokens=60, temperature=0, response_format=FORMAT, stream=True)]
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == greedy.message.content and streamed[-1].choices[0].finish_reason == "stop"


def test_json_object_gives_an_object(served):
    messages = [{"role": "user", "content": "config = "}]
    plain = ask(served, temperature=0, messages=messages, max_tokens=8).choices[0].message.content
    assert not plain.startswith("{")  # unconstrained, this model does not answer with an object here
    reply = ask(served, temperature=0, messages=messages, response_format={"type": "json_object"}).choices[0]
    assert reply.finish_reason == "stop" and isinstance(json.loads(reply.message.content), dict)


def test_a_reply_cut_by_max_tokens_is_the_start_of_the_valid_one(served):
    whole = ask(served, temperature=0, response_format=FORMAT).choices[0].message.content
    cut = ask(served, temperature=0, response_format=FORMAT, max_tokens=4).choices[0]
    assert cut.finish_reason == "length" and len(cut.message.content) < len(whole)
    assert whole.startswith(cut.message.content)


@pytest.mark.slow  # ~4 s: eight requests, twice
def test_constrained_and_free_requests_share_a_batch(served, demo_engine):
    """Free requests decode the same tokens beside constrained ones (the mask is per row), and every constrained
    reply validates."""
    prompts = [PROMPT, "class Point:\n", "import os\n", "while True:\n"]
    free = [ask(served, temperature=0, messages=[{"role": "user", "content": p}]).choices[0].message.content
            for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(ask, served, temperature=0.8, seed=i, response_format=FORMAT) for i in range(4)]
        together = [pool.submit(ask, served, temperature=0, messages=[{"role": "user", "content": p}])
                    for p in prompts]
        assert [f.result().choices[0].message.content for f in together] == free
        for future in constrained:
            jsonschema.validate(json.loads(future.result().choices[0].message.content), SCHEMA)


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}}},
     "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "response_format"),
    ({"type": "json_object", "json_schema": {"name": "x"}}, "json_schema"),
    ({"type": "yaml"}, "response_format"),
])
def test_a_schema_that_cannot_be_used_is_a_400(served, response_format, message):
    with pytest.raises(openai.BadRequestError, match=message) as refused:
        ask(served, response_format=response_format)
    assert refused.value.body["param"].startswith("response_format")


def test_without_llguidance_a_grammar_is_refused_with_the_extra_to_install(demo_engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(GrammarError, match=r"moeshard\[structured\]"):
        Grammars(demo_engine.tokenizer, demo_engine.vocab_size, [1]).json_schema(SCHEMA)
