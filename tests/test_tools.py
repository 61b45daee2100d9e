"""Tool calling: the format read from the chat template's markers, replies parsed into OpenAI's tool_calls (whole and
streamed, in every split), text that is not a call kept as text, added tokens forced as tokens; and end to end on the
trained demo model behind the official openai client, under templates written in each family's format (Qwen's
<tool_call>, Mixtral's [TOOL_CALLS], gpt-oss's harmony): forced calls (required, named) that validate, streamed and
not, sent back with the tool's result through the template; auto; a call cut short returned as text.
"""
from __future__ import annotations

import copy
import json

import jsonschema
import openai
import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

from moeshard.coordinator import tools as tool_calls
from moeshard.coordinator.batching import BatchConfig
from moeshard.coordinator.grammar import Grammars
from moeshard.coordinator.tools import Call, Harmony, Hermes, Mistral, ToolCallParser, ToolUse
from moeshard.offload_core.demo import demo_model_path

from .test_openai_surface import call, serving

# Templates in each family's format (the markers, the tools, calls and results as the real ones write them).
QWEN = """{%- if tools %}<|im_start|>system
# Tools

<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

MIXTRAL = """{{ bos_token }}{%- if tools %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}[INST] {{ message.content }} [/INST]
{%- elif message.role == 'assistant' and message.tool_calls %}[TOOL_CALLS] [
{%- for call in message.tool_calls %}
{%- if call.id | length != 9 %}{{ raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}{% endif %}
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}, "id": "{{ call.id }}"}
{{- ", " if not loop.last }}
{%- endfor %}]{{ eos_token }}
{%- elif message.role == 'assistant' %}{{ message.content }}{{ eos_token }}
{%- elif message.role == 'tool' %}[TOOL_RESULTS] {"content": {{ message.content | tojson }}, "call_id": "{{ message.tool_call_id }}"}[/TOOL_RESULTS]
{%- endif %}
{%- endfor %}"""

GPT_OSS = """<|start|>system<|message|>Reasoning: low<|end|>
{%- if tools %}<|start|>developer<|message|># Tools

namespace functions {
{%- for tool in tools %}
type {{ tool.function.name }} = (_: {{ tool.function.parameters | tojson }}) => any;
{%- endfor %}
} // namespace functions<|end|>{% endif %}
{%- set last = namespace(call=none) %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}
{%- set last.call = message.tool_calls[0].function %}<|start|>assistant<|channel|>commentary to=functions.{{ last.call.name }} <|constrain|>json<|message|>{{ last.call.arguments | tojson }}<|call|>
{%- elif message.role == 'tool' %}<|start|>functions.{{ last.call.name }} to=assistant<|channel|>commentary<|message|>{{ message.content }}<|end|>
{%- else %}<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start|>assistant{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
RESULT_MARK = {"QWEN": "<tool_response>\n18 C, sunny\n</tool_response>", "MIXTRAL": '"18 C, sunny", "call_id": "',
               "GPT_OSS": "to=assistant<|channel|>commentary<|message|>18 C, sunny<|end|>"}


# -- formats and parsing --------------------------------------------------------------------

def test_the_format_is_read_from_the_template_s_markers():
    assert isinstance(tool_calls.detect(QWEN), Hermes)
    assert isinstance(tool_calls.detect(MIXTRAL), Mistral) and not tool_calls.detect(MIXTRAL).named
    assert tool_calls.detect(MIXTRAL + "[ARGS]").named  # newer Mistral templates: [TOOL_CALLS]name[ARGS]{...}
    assert isinstance(tool_calls.detect(GPT_OSS), Harmony)
    assert tool_calls.detect("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert tool_calls.detect(None) is None


HERMES_TWO = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
PARSED = [
    (Hermes(), HERMES_TWO, "Let me check.\n", [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    (Hermes(), "plain <tool text < b", "plain <tool text < b", []),
    (Hermes(), '<tool_call>\n{"name": "add", "arguments": {"a": 1</tool_call> after',
     '<tool_call>\n{"name": "add", "arguments": {"a": 1</tool_call> after', []),  # not JSON: text
    (Hermes(), '<tool_call>\n{"name": "add", "arguments": {"a": 1', '<tool_call>\n{"name": "add", "arguments": {"a": 1',
     []),  # cut short: text
    (Mistral(), '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", '
                '"arguments": {"city": "Oslo"}}]', "", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]),
    (Mistral(), '[TOOL_CALLS] [{"name": "add", "argu', '[TOOL_CALLS] [{"name": "add", "argu', []),
    (Mistral(), '[TOOL_CALLS] [{"nom": "add"}]', '[TOOL_CALLS] [{"nom": "add"}]', []),
    (Mistral(named=True), '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}', "",
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome"})]),
    (Harmony(), '<|channel|>analysis<|message|>The user wants weather.<|end|><|start|>assistant<|channel|>commentary '
                'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}', "",
     [("get_weather", {"city": "Paris"})]),
    (Harmony(), "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>"
                "It is <b>18</b>", "It is <b>18</b>", []),
    (Harmony(), '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 1',
     '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 1', []),
    (Harmony(), "a model that ignores harmony", "a model that ignores harmony", []),
]


def _parse(fmt, text: str, step: int) -> tuple[str, list]:
    parser = ToolCallParser(copy.copy(fmt))
    content, calls = "", []
    for i in range(0, len(text), step):
        more, new = parser.push(text[i:i + step])
        content, calls = content + more, calls + new
    more, new = parser.finish()
    assert [index for index, _, _ in calls + new] == list(range(len(calls + new)))  # streamed in order, once each
    return content + more, [(c.name, json.loads(c.arguments)) for _, _, c in calls + new]


@pytest.mark.parametrize("fmt, text, content, calls", PARSED)
def test_a_reply_parses_the_same_whole_and_streamed_in_any_split(fmt, text, content, calls):
    for step in (len(text) or 1, 1, 2, 3, 7):
        assert _parse(fmt, text, step) == (content, calls), step


def test_text_is_streamed_before_the_reply_ends_and_a_call_once_it_closes():
    parser = ToolCallParser(Hermes())
    assert parser.push("Checking the weather <tool") == ("Checking the weather ", [])  # "<tool" may be a call
    assert parser.push('_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}') == ("", [])
    content, calls = parser.push("\n</tool_call>")
    assert content == "" and [(i, c) for i, _, c in calls] == [(0, Call("add", '{"a": 1, "b": 2}'))]


def test_without_parallel_calls_only_the_first_is_kept():
    message, finish = tool_calls.reply(ToolCallParser(Hermes(), single=True), HERMES_TWO, "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"] and finish == "tool_calls"
    message, finish = tool_calls.reply(ToolCallParser(Hermes()), HERMES_TWO, "length")
    assert len(message["tool_calls"]) == 2 and finish == "length"  # calls, but the reply was cut: as OpenAI says
    assert all(c["id"].startswith("call_") for c in message["tool_calls"])
    assert all(len(Mistral().call_id()) == 9 and Mistral().call_id().isalnum() for _ in range(20))


@pytest.mark.parametrize("fmt, call_text", [
    (Hermes(), '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'),
    (Mistral(), '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]'),
    (Harmony(), '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 1, "b": 2}'),
])
def test_a_forced_call_takes_markers_that_are_added_tokens_as_those_tokens(demo_engine, fmt, call_text):
    """Real checkpoints have their markers as added tokens; llguidance matches those by id, never by their text."""
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    tokenizer.add_tokens([AddedToken(m, special=m.startswith(("[", "<|")), normalized=False)
                          for m in ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|channel|>", "<|constrain|>",
                                    "<|message|>")])
    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    grammar = ToolUse(fmt, [ADD], "add", False).grammar(grammars)

    def accepted(ids: list[int]) -> bool:
        constraint = grammars.start(grammar)
        for token in ids:
            constraint.advance(token)
        return not constraint.failed and constraint.matcher.is_accepting()

    as_tokens = tokenizer.encode(call_text, add_special_tokens=False)
    assert any(t >= demo_engine.vocab_size for t in as_tokens)  # the markers are single added tokens here
    assert accepted(as_tokens)
    spelled = demo_engine.tokenizer.encode(call_text, add_special_tokens=False)  # the same text without them
    assert not accepted(spelled)


# -- end to end on the demo model -------------------------------------------------------------

@pytest.fixture(scope="module")
def served(demo_engine):
    tokenizer = demo_engine.tokenizer
    before = tokenizer.chat_template
    with serving(demo_engine, BatchConfig(max_batch=8, max_queue=16, step_tokens=128)) as (base, client):
        def chat(template: str, **kwargs):
            tokenizer.chat_template = template  # read by the server at each request
            ask = {"model": demo_engine.name, "messages": ASK, "tools": TOOLS, "max_tokens": 80, "temperature": 0}
            return client.chat.completions.create(**{**ask, **kwargs})

        yield demo_engine, base, client, chat
    tokenizer.chat_template = before


def _valid(call) -> dict:
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schema)
    return arguments


@pytest.mark.slow  # ~2.5 s each: four requests
@pytest.mark.parametrize("name", ["QWEN", "MIXTRAL", "GPT_OSS"])
def test_a_forced_call_round_trip(served, name):
    """tool_choice required (one call) and named: a call that validates, finish_reason tool_calls, the same streamed
    (assembled by the client's own stream helper); then the call and the tool's result go back through the template
    and the conversation goes on."""
    engine, base, client, chat = served
    template = globals()[name]
    reply = chat(template, tool_choice="required", parallel_tool_calls=False).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    (first,) = reply.message.tool_calls
    _valid(first)
    named = chat(template, tool_choice={"type": "function", "function": {"name": "add"}}).choices[0]
    assert named.finish_reason == "tool_calls" and [c.function.name for c in named.message.tool_calls] == ["add"]
    _valid(named.message.tool_calls[0])
    tokenizer = engine.tokenizer
    tokenizer.chat_template = template
    with client.chat.completions.stream(model=engine.name, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,
                                        tool_choice="required", parallel_tool_calls=False) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
        [(first.function.name, first.function.arguments)]
    conversation = ASK + [reply.message.model_dump(include={"role", "content", "tool_calls"}),
                          {"role": "tool", "tool_call_id": first.id, "content": "18 C, sunny"}]
    again = chat(template, messages=conversation, tool_choice={"type": "function", "function": {"name": "add"}})
    assert again.choices[0].finish_reason == "tool_calls"
    status, rendered = call(base, "POST", "/tokenize", {"messages": conversation})
    text = tokenizer.decode(rendered["tokens"])
    assert status == 200 and RESULT_MARK[name] in text and first.function.arguments in text


@pytest.mark.slow  # ~3 s
def test_auto_gives_the_model_s_own_text_when_it_calls_nothing(served):
    """This model was never taught to call tools: under auto its reply is the plain text that the same prompt gives
    (the template's tools included), with no calls; required makes it call."""
    engine, base, client, chat = served
    reply = chat(QWEN, tool_choice="auto", max_tokens=24).choices[0]
    ids = tool_calls.encode(engine.tokenizer, ASK, TOOLS)
    plain = client.completions.create(model=engine.name, prompt=ids, max_tokens=24, temperature=0).choices[0]
    assert reply.message.tool_calls is None and reply.message.content == plain.text
    assert reply.finish_reason == plain.finish_reason
    default = chat(QWEN, max_tokens=24).choices[0]  # tools without tool_choice: auto
    assert default.message.content == plain.text


def test_a_call_cut_short_is_returned_as_text(served):
    engine, base, client, chat = served
    reply = chat(QWEN, tool_choice="required", max_tokens=12).choices[0]
    assert reply.finish_reason == "length" and reply.message.tool_calls is None
    assert reply.message.content.startswith("<tool_call>\n{")
    chunks = list(chat(QWEN, tool_choice="required", max_tokens=12, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.slow  # ~3 s
def test_required_with_parallel_calls_may_call_several_times(served):
    engine, base, client, chat = served
    reply = chat(QWEN, tool_choice="required", max_tokens=120).choices[0]  # this model repeats its call
    assert len(reply.message.tool_calls) >= 2
    for tool_call in reply.message.tool_calls:
        _valid(tool_call)
    assert len({c.id for c in reply.message.tool_calls}) == len(reply.message.tool_calls)


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": None, "parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "minProperties": "x"}}}],
      "tool_choice": "required"}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]}, "messages.0"),
])
def test_tools_that_cannot_be_served_are_refused_by_name(served, fields, param):
    engine, base, client, chat = served
    with pytest.raises(openai.BadRequestError) as refused:
        chat(QWEN, **{k: openai.NOT_GIVEN if v is None else v for k, v in fields.items()})
    assert refused.value.body["param"] == param, refused.value.body


def test_a_call_id_that_the_template_refuses_is_a_400(served):
    engine, base, client, chat = served
    conversation = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_123456789abc", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_123456789abc", "content": "3"}]
    with pytest.raises(openai.BadRequestError, match="length 9") as refused:
        chat(MIXTRAL, messages=conversation)
    assert refused.value.body["param"] == "messages"
