"""Tool calling in a model's own format: which format a chat template speaks (read from its markers, never from the
model's name), the text of a reply parsed back into OpenAI's `tool_calls` (whole, or as a stream of deltas), and the
Lark grammar that forces a call (`tool_choice` "required" or a named function).

Formats: `Hermes` (Qwen3, Qwen2.5, Qwen2: `<tool_call>{json}</tool_call>`), `Mistral` (Mixtral and Mistral:
`[TOOL_CALLS] [{json}, ...]`, or `[TOOL_CALLS]name[ARGS]{json}` where the template writes `[ARGS]`) and `Harmony`
(gpt-oss: `<|channel|>commentary to=functions.name <|constrain|>json<|message|>{json}<|call|>`). Text that looks like
a call but does not parse stays text. Tools reach the model through its chat template (`encode`); no HTTP here.
"""
from __future__ import annotations

import copy
import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .grammar import Grammars, json_schema_lark


class ToolError(ValueError):
    """A request's tools that this server cannot serve for this model; `param` names the field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Call(NamedTuple):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class Text(NamedTuple):
    text: str


def _holdback(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (held back until it is known)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _text_until(text: str, pos: int, marker: str, final: bool, out: list) -> tuple[int, int]:
    """Appends to `out` the text from `pos` to the next `marker` and returns (its index, that index). With no marker:
    appends what is settled (all of it when `final`, else all but a possible start of the marker) and returns
    (-1, where the settled text ends)."""
    i = text.find(marker, pos)
    end = i if i >= 0 else len(text) - (0 if final else _holdback(text[pos:], marker))
    if end > pos:
        out.append(Text(text[pos:end]))
    return i, max(end, pos)


def _call(value: Any) -> Call | None:
    """{"name": ..., "arguments": {...}} (or "parameters", as some fine-tunes write it) as a call; else None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # arguments written as JSON text: kept if it is JSON
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):  # a function's arguments are an object
        return None
    return Call(value["name"], json.dumps(arguments, ensure_ascii=False))


def _json_at(text: str) -> tuple[Any, int] | None:
    """The JSON value that `text` starts with (after whitespace) and where it ends; None while it is incomplete or
    not JSON."""
    start = len(text) - len(text.lstrip())
    try:
        value, end = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    return value, end


class ToolFormat:
    """One family's tool-call syntax: `scan` finds calls in a reply's text, `lark` forces one."""
    markers: tuple[str, ...] = ()  # a chat template that contains all of these speaks this format

    def scan(self, text: str, final: bool) -> tuple[list[Call | Text], int]:
        """The calls and text at the start of `text` that are settled, and how many characters they take; with
        `final`, all of it (a call left open is text)."""
        raise NotImplementedError

    def lark(self, calls: list[tuple[str, dict]], parallel: bool) -> str:
        """A grammar of one call (or, with `parallel`, one or more), each one of `calls`: (the Lark text before the
        call's JSON, the JSON's schema), from `ToolUse._call_parts`."""
        raise NotImplementedError

    def call_id(self) -> str:
        return "call_" + secrets.token_hex(12)


def _alternatives(calls: list[tuple[str, dict]]) -> str:
    """Lark rules: `call` is one of `calls`, each (the Lark text before its JSON, the JSON's schema)."""
    rules = [f"\ncall_{i}: {prefix} json_{i}\njson_{i}: {json_schema_lark(schema)}"
             for i, (prefix, schema) in enumerate(calls)]
    return "\ncall: " + " | ".join(f"call_{i}" for i in range(len(calls))) + "".join(rules)


def _token(grammars: Grammars, text: str) -> str:
    """`text` in a grammar: its added token where the tokenizer has one (llguidance matches those by id), else the
    characters."""
    token = grammars.special_token(text)
    return f"<[{token}]>" if token is not None else json.dumps(text)


class Hermes(ToolFormat):
    markers = ("<tool_call>", "</tool_call>")
    OPEN, CLOSE = markers

    def scan(self, text, final):
        out, pos = [], 0
        while True:
            i, settled = _text_until(text, pos, self.OPEN, final, out)
            if i < 0:
                return out, settled
            j = text.find(self.CLOSE, i)
            if j < 0:
                if final:
                    out.append(Text(text[i:]))
                    return out, len(text)
                return out, i
            found = _json_at(text[i + len(self.OPEN):j])
            call = _call(found[0]) if found and not text[i + len(self.OPEN) + found[1]:j].strip() else None
            out.append(call or Text(text[i:j + len(self.CLOSE)]))
            pos = j + len(self.CLOSE)

    def lark(self, calls, parallel):
        one = '"<tool_call>" "\\n" call "\\n" "</tool_call>"'
        return f"start: {one}" + (f' ("\\n" {one})*' if parallel else "") + _alternatives(calls)


class Mistral(ToolFormat):
    markers = ("[TOOL_CALLS]",)
    MARK = "[TOOL_CALLS]"
    ARGS = "[ARGS]"

    def __init__(self, named: bool = False):
        self.named = named  # [TOOL_CALLS]name[ARGS]{...} (newer templates), not a JSON list

    def scan(self, text, final):
        out, pos = [], 0
        while True:
            i, settled = _text_until(text, pos, self.MARK, final, out)
            if i < 0:
                return out, settled
            body = text[i + len(self.MARK):]
            calls, used = self._calls(body)
            if calls is None:
                if not final:
                    return out, i
                out.append(Text(text[i:]))
                return out, len(text)
            out.extend(calls)
            pos = i + len(self.MARK) + used

    def _calls(self, body: str) -> tuple[list[Call | Text] | None, int]:
        if body.lstrip().startswith(("[", "{")):
            found = _json_at(body)
            if found is None:
                return None, 0
            value, end = found
            items = value if isinstance(value, list) else [value]
            calls = [_call(item) for item in items]
            if not items or None in calls:
                return [Text(self.MARK + body[:end])], end
            return calls, end
        k = body.find(self.ARGS)
        if k < 0 or not re.fullmatch(r"\s*[\w.\-]+", body[:k]):
            return None, 0
        found = _json_at(body[k + len(self.ARGS):])
        if found is None:
            return None, 0
        end = k + len(self.ARGS) + found[1]
        if not isinstance(found[0], dict):
            return [Text(self.MARK + body[:end])], end
        return [Call(body[:k].strip(), json.dumps(found[0], ensure_ascii=False))], end

    def lark(self, calls, parallel):
        if self.named:
            one = '"[TOOL_CALLS]" call'
            return f"start: {one}" + (f" ({one})*" if parallel else "") + _alternatives(calls)
        return 'start: "[TOOL_CALLS]" " [" call' + (' (", " call)*' if parallel else "") + ' "]"' + _alternatives(calls)

    def call_id(self) -> str:  # Mistral's templates refuse any other: nine letters or digits
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


class Harmony(ToolFormat):
    """gpt-oss: a reply is messages, each `<|channel|>name[ to=recipient][ <|constrain|>json]<|message|>body` ending
    in `<|end|>` (then `<|start|>assistant`), `<|call|>` or `<|return|>`. A message to `functions.x` is a call; the
    `final` channel (and `commentary` to no one) is the reply's text; `analysis` (reasoning) is left out."""
    markers = ("<|channel|>", "<|message|>")
    MESSAGE = "<|message|>"
    ENDS = ("<|end|>", "<|call|>", "<|return|>")

    def __init__(self):
        self.body: str | None = None  # inside a message whose body is being streamed as text: "text" or "skip"

    def scan(self, text, final):
        out, pos = [], 0
        while pos < len(text):
            if self.body is not None:  # a text body, streamed as it comes
                ends = [k for k in (text.find(e, pos) for e in self.ENDS) if k >= 0]
                end = min(ends) if ends else len(text)
                stop = end if ends or final else len(text) - max(_holdback(text[pos:], e) for e in self.ENDS)
                if self.body == "text" and stop > pos:
                    out.append(Text(text[pos:stop]))
                if not ends and not final:
                    return out, max(stop, pos)
                self.body, pos = None, end + next((len(e) for e in self.ENDS if text.startswith(e, end)), 0)
                continue
            m = text.find(self.MESSAGE, pos)
            if m < 0:
                if final and text[pos:].strip():
                    out.append(Text(text[pos:]))  # not harmony, or a header cut short: the text as it is
                return out, len(text) if final else pos
            header = text[pos:m].replace("<|start|>assistant", "")
            channel = re.search(r"<\|channel\|>\s*(\w+)", header)
            recipient = re.search(r"to=([^\s<]+)", header)
            start = m + len(self.MESSAGE)
            if recipient and recipient.group(1).startswith("functions."):
                ends = [k for k in (text.find(e, start) for e in self.ENDS) if k >= 0]
                if not ends and not final:
                    return out, pos
                end = min(ends) if ends else len(text)
                body = text[start:end]
                found = _json_at(body)
                if found is not None and isinstance(found[0], dict) and not body[found[1]:].strip():
                    out.append(Call(recipient.group(1)[len("functions."):], json.dumps(found[0], ensure_ascii=False)))
                else:
                    out.append(Text(text[pos:end]))
                pos = end + next((len(e) for e in self.ENDS if text.startswith(e, end)), 0)
                continue
            name = channel.group(1) if channel else "final"
            self.body = "skip" if name == "analysis" or recipient else "text"
            pos = start
        return out, pos

    def lark(self, calls, parallel):  # one call per reply: <|call|> ends the turn
        return "start: call" + _alternatives(calls)


FORMATS = (Harmony, Mistral, Hermes)  # the first whose markers a template has (harmony's are the most specific)


def detect(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format that a chat template writes, by the markers it contains."""
    if not chat_template:
        return None
    for fmt in FORMATS:
        if all(m in chat_template for m in fmt.markers):
            return Mistral(named="[ARGS]" in chat_template) if fmt is Mistral else fmt()
    return None


@dataclass
class ToolCallParser:
    """A reply's text, pushed as it streams, split into text and calls as soon as each is settled; `finish` settles
    the rest. With `single`, calls after the first are dropped (parallel_tool_calls: false)."""
    fmt: ToolFormat
    single: bool = False
    buffer: str = ""
    calls: list[tuple[str, Call]] = field(default_factory=list)  # (id, call), in order
    after_call: bool = False  # whitespace right after a call is not text

    def push(self, text: str, final: bool = False) -> tuple[str, list[tuple[int, str, Call]]]:
        """The text settled by `text` and the calls completed by it, as (index, id, call)."""
        self.buffer += text
        items, used = self.fmt.scan(self.buffer, final)
        self.buffer = self.buffer[used:]
        content, new = [], []
        for item in items:
            if isinstance(item, Call):
                self.after_call = True
                if self.single and self.calls:
                    continue
                self.calls.append((self.fmt.call_id(), item))
                new.append((len(self.calls) - 1, *self.calls[-1]))
                continue
            piece = item.text
            if self.after_call:
                piece = piece.lstrip()
                if not piece:
                    continue
                self.after_call = False
            content.append(piece)
        return "".join(content), new

    def finish(self) -> tuple[str, list[tuple[int, str, Call]]]:
        return self.push("", final=True)


def encode(tokenizer, messages: list[dict], tools: list[dict]) -> list[int]:
    """A conversation and its tools through the model's own chat template, ready for the reply."""
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def delta(content: str, calls: list[tuple[int, str, Call]]) -> dict:
    """A stream's delta: the text and the calls settled since the last one (nothing: {})."""
    out: dict = {"content": content} if content else {}
    if calls:
        out["tool_calls"] = [tool_call(index, call_id, call) for index, call_id, call in calls]
    return out


def tool_call(index: int | None, call_id: str, call: Call) -> dict:
    """A call as OpenAI writes it (`index` only in a stream's delta)."""
    out = {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return out if index is None else {"index": index, **out}


@dataclass(frozen=True)
class ToolUse:
    """A chat request's tools for one model: its format, the tools (OpenAI's form, as templates take them), what
    `tool_choice` asks for and whether calls may come several at once."""
    fmt: ToolFormat
    tools: list[dict]
    choice: str  # "auto", "required", or the name of the function to call
    parallel: bool

    @classmethod
    def of(cls, tools: list[dict], mode: str | None, named: str | None, parallel: bool | None,
           chat_template: str | None) -> ToolUse | None:
        """`mode`: tool_choice "none", "auto" or "required" (None: "auto" with tools); `named`: the function that
        tool_choice names. None when there are no tools, or with "none" (the tools are still shown to the model)."""
        if not tools:
            if mode not in (None, "none") or named is not None:
                raise ToolError("tool_choice: needs tools", "tool_choice")
            if parallel is not None:
                raise ToolError("parallel_tool_calls: needs tools", "parallel_tool_calls")
            return None
        fmt = detect(chat_template)
        if fmt is None:
            raise ToolError("tools: this model's chat template has no tool-call format that this server knows "
                            "(<tool_call>, [TOOL_CALLS] or harmony's <|channel|>): it cannot be given tools", "tools")
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            raise ToolError("tools: two tools have the same name", "tools")
        if named is not None and named not in names:
            raise ToolError(f"tool_choice: no tool is named {named!r}", "tool_choice")
        if mode == "none":
            return None
        return cls(fmt, tools, named or mode or "auto", parallel is not False)

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def grammar(self, grammars: Grammars) -> str | None:
        """For "required" or a named function: the grammar that makes the reply a call to one of the tools (or to
        that one) with arguments valid for its parameters' schema; None for "auto"."""
        if not self.forced:
            return None
        tools = [t for t in self.tools if self.choice == "required" or t["function"]["name"] == self.choice]
        parts = [self._call_parts(t["function"]) for t in tools]
        text = self.fmt.lark(parts, self.parallel and self.choice == "required")
        return grammars.lark(_tokens(grammars, text))

    def _call_parts(self, function: dict) -> tuple[str, dict]:
        parameters = function.get("parameters") or {"type": "object"}
        name = function["name"]
        if isinstance(self.fmt, Harmony):
            return f'"<|channel|>" "commentary to=functions.{name} " "<|constrain|>" "json" "<|message|>"', parameters
        if isinstance(self.fmt, Mistral) and self.fmt.named:
            return f'"{name}" "[ARGS]"', parameters
        return "", {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                    "required": ["name", "arguments"], "additionalProperties": False}

    def parser(self) -> ToolCallParser:
        """A parser for one reply (a format may keep state while it reads one)."""
        return ToolCallParser(copy.copy(self.fmt), single=not self.parallel)


_MARKERS = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|channel|>", "<|constrain|>", "<|message|>")


def _tokens(grammars: Grammars, lark: str) -> str:
    """A grammar's quoted markers as the tokenizer's added tokens, where it has them."""
    for marker in _MARKERS:
        quoted = json.dumps(marker)
        if quoted in lark:
            lark = lark.replace(quoted, _token(grammars, marker))
    return lark


def finish_reason(calls: bool, finish: str) -> str:
    """OpenAI's finish_reason: "tool_calls" when a reply that ended by itself made calls."""
    return "tool_calls" if calls and finish == "stop" else finish


def reply(parser: ToolCallParser, text: str, finish: str) -> tuple[dict, str]:
    """A whole reply as OpenAI's assistant message (content null when it is only calls), and its finish_reason."""
    content, calls = parser.push(text)
    rest, more = parser.finish()
    content, calls = content + rest, calls + more
    message = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        message["tool_calls"] = [tool_call(None, call_id, call) for _, call_id, call in calls]
    return message, finish_reason(bool(calls), finish)
