"""The request bodies `serve` takes (OpenAI's completions and chat; vLLM's /tokenize and /detokenize) and the
log-probability parts of its replies, in OpenAI's shapes. Validation and formatting only: no model, no handlers.

A parameter this server does not implement is refused with a 400 naming it, never ignored: unknown names are
refused by `extra="forbid"`, known ones that ask for something unsupported by `_only`.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .sampling import MAX_LOGPROBS, TokenLogprob

MAX_CHOICES = 128  # n per request, as OpenAI allows; the batch and its queue may hold fewer (a 400 says so)
LOWEST_LOGPROB = -9999.0  # JSON has no -inf: a log-probability that underflows is reported as this (as vLLM does)
_TOKEN_KEY = re.compile(r"0|[1-9][0-9]{0,9}")  # logit_bias keys: token ids written as decimal strings


def _valid_unicode(value):
    """A string, or strings, that UTF-8 can encode: JSON's "\\ud800" decodes to a lone surrogate, which no
    tokenizer takes."""
    for text in [value] if isinstance(value, str) else (value or ()):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PydanticCustomError("invalid_unicode", "contains a lone UTF-16 surrogate at character {position}; "
                                      "expected valid Unicode text", {"position": exc.start}) from None
    return value


def _message_text(content: Any) -> str:
    """A message's content as text: a string, or a list of text parts; null is ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return _valid_unicode(content)
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                                         and isinstance(p["text"], str) for p in content):
        return _valid_unicode("".join(p["text"] for p in content))
    raise PydanticCustomError("content_type", "expected a string or a list of {part} parts (this server takes text "
                              "only)", {"part": '{"type": "text", "text": "..."}'})


def _is_token(value: Any) -> bool:
    return type(value) is int  # JSON's integers; true and false are not token ids


def _prompts(value: Any) -> list[str | list[int]]:
    """A completion's `prompt` as a list of prompts, each a string or a list of token ids (checked against the
    vocabulary by the server, which knows it)."""
    if isinstance(value, str):
        return [_valid_unicode(value)]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return _valid_unicode(value)
        if all(_is_token(t) for t in value):
            return [value]
        if all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in value):
            return value
    raise PydanticCustomError("prompt_type", "expected a string, a list of strings, a list of token ids or a list of "
                              "lists of token ids (none of them empty)")


def _only(accepted: str, *values):
    """A parameter this server does not implement: accepted only with a value that asks for nothing (OpenAI's
    default), refused otherwise with a message naming it."""

    def check(value):
        if not any(value == v and type(value) is type(v) for v in values):
            raise PydanticCustomError("unsupported_value", "not supported by this server: remove it, or send "
                                      "{accepted}", {"accepted": accepted})
        return value

    return Annotated[Any, AfterValidator(check)]


_Zero = _only("null or 0", None, 0, 0.0)


class _Request(BaseModel):
    # an unknown parameter is refused, never silently ignored; types are JSON's own ("12" is not a number, "yes"
    # not a boolean; an integer is a number)
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False  # a last chunk with the usage and no choices, as OpenAI sends it


class _Sampling(_Request):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # choice i of n samples with seed + i
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)  # choices per prompt, each its own sequence in the batch
    user: str | None = None  # the caller's end-user id, for its own records: nothing here depends on it
    presence_penalty: _Zero = None
    frequency_penalty: _Zero = None
    # token id (a decimal string) -> added to its logit before the choice; up to 300 (request_body's limit)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None

    @field_validator("model", "stop", "user")
    @classmethod
    def _unicode(cls, value):
        return _valid_unicode(value)

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, value):
        for key in value or {}:
            if not _TOKEN_KEY.fullmatch(key):
                raise PydanticCustomError("token_key", "keys are token ids written as decimal strings (\"50256\"), "
                                          "got {key}", {"key": repr(key[:20])})
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: Annotated[Any, AfterValidator(_prompts)]  # one choice per prompt (times n), in order
    max_tokens: int | None = Field(default=16, ge=0)  # 0 only with echo: the prompt scored, nothing generated
    echo: bool = False  # the reply's text starts with the prompt (and its logprobs with the prompt's)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # N likeliest per token (OpenAI: up to 5)
    best_of: _only("null or 1", None, 1) = None
    suffix: _only('null or "" (this server does not fill in the middle: no text after the insertion)',
                  None, "") = None


_TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names (they are written into grammars)


class FunctionCall(_Request):
    name: str = Field(pattern=_TOOL_NAME)
    arguments: str  # JSON text

    @field_validator("arguments")
    @classmethod
    def _unicode(cls, value):
        return _valid_unicode(value)


class ToolCall(_Request):
    """A call the assistant made, sent back in the conversation."""
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[Any, AfterValidator(_message_text)] = ""
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)  # an assistant's calls
    tool_call_id: str | None = Field(default=None, max_length=256)  # a tool's reply: to which call

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError("tool_calls_role", "tool_calls: only in an assistant's message")
        if self.tool_call_id is not None and self.role != "tool":
            raise PydanticCustomError("tool_call_id_role", "tool_call_id: only in a tool's message")
        return self

    def for_template(self) -> dict:
        """The message as chat templates take it (transformers' convention): a call's arguments as an object."""
        out = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:  # not JSON: the template gets the text as the client sent it
        return text


class FunctionDefinition(_Request):
    name: str = Field(pattern=_TOOL_NAME)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments (an object); none: any object
    strict: bool | None = None  # forced calls (tool_choice required or named) always follow the schema

    @field_validator("description")
    @classmethod
    def _unicode(cls, value):
        return _valid_unicode(value)


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition

    def for_template(self) -> dict:
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class _FunctionName(_Request):
    name: str = Field(pattern=_TOOL_NAME)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: _FunctionName


class JsonSchemaFormat(_Request):
    name: str = Field(pattern=_TOOL_NAME)
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # none: any JSON object
    strict: bool | None = None  # the output always follows the schema (decoding is constrained), strict or not


class ResponseFormat(_Request):
    """`text`, `json_object` (any JSON object) or `json_schema`."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError("json_schema", "json_schema: expected with type json_schema, and only then")
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None  # each new token's log-probability in choices[i].logprobs.content
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # and the N likeliest (with logprobs)
    response_format: ResponseFormat | None = None  # json_object / json_schema: decoding constrained to it
    tools: list[Tool] | None = None  # given to the model through its chat template
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call per reply


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a `prompt`, or chat `messages` through the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # a prompt's: true unless false; messages: as the chat template writes them
    add_generation_prompt: bool = True  # messages: end with the assistant's header, as chat completions do
    return_token_strs: bool = False  # also each token as the tokenizer's vocabulary writes it

    @field_validator("model", "prompt")
    @classmethod
    def _unicode(cls, value):
        return _valid_unicode(value)


class DetokenizeRequest(_Request):
    """vLLM's /detokenize."""
    model: str | None = None
    tokens: list[int]

    @field_validator("model")
    @classmethod
    def _unicode(cls, value):
        return _valid_unicode(value)


class TokenTexts:
    """Each token's text alone, cached: as the tokenizer writes it (special tokens shown: the `token` of a
    log-probability) and as it counts in a reply's text (special tokens skipped: its text offsets)."""

    def __init__(self, tokenizer):
        self.shown: Callable[[int], str] = functools.lru_cache(1 << 16)(lambda t: tokenizer.decode([t]))
        self.visible: Callable[[int], str] = functools.lru_cache(1 << 16)(
            lambda t: tokenizer.decode([t], skip_special_tokens=True))


def _value(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


class LegacyLogprobs:
    """OpenAI's legacy `logprobs` of one completion choice, built whole or piece by piece (a stream): `tokens`,
    `token_logprobs`, `top_logprobs` (the likeliest as {token: logprob}, plus the token itself, as OpenAI adds it)
    and `text_offset` (where each token's text starts in the choice's text; special tokens take no room)."""

    def __init__(self, texts: TokenTexts, offset: int = 0):
        self.texts, self.offset = texts, offset

    def piece(self, ids: list[int], entries: list[TokenLogprob | None]) -> dict:
        """`entries[i]` for token `ids[i]`; None where there is none (a prompt's first token)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, e in zip(ids, entries):
            out["tokens"].append(self.texts.shown(token))
            out["text_offset"].append(self.offset)
            self.offset += len(self.texts.visible(token))
            if e is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_value(e.logprob))
            top = {self.texts.shown(t): _value(v) for t, v in e.top}
            top.setdefault(self.texts.shown(token), _value(e.logprob))
            out["top_logprobs"].append(top)
        return out


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict:
    """OpenAI's chat `logprobs`: per token its text, log-probability and UTF-8 bytes, and the N likeliest."""

    def one(token: int, logprob: float) -> dict:
        text = texts.shown(token)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries],
            "refusal": None}
