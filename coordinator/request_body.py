"""A request body, from bytes to a bounded JSON object, before any model is validated against it.

Lists are counted before anything is validated (validating 110,000 tiny chat messages took 0.5 s of the event
loop). Parsing itself holds the GIL (a 3.7 MB body of small objects: about 60 ms here), so a thread does not
free the event loop; `BodyParser` parses bodies past `LARGE_BODY` in a separate process (spawned on first use,
one at a time), and the event loop only hands it bytes. This module imports nothing but the standard library:
it is what that process loads.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

LIST_LIMITS = {"messages": 4096, "stop": 4, "prompt": 1 << 17, "logit_bias": 300, "tools": 128, "tokens": 1 << 17}
MAX_CONTENT_PARTS = 256  # text parts in one message's content
LARGE_BODY = 256 << 10  # bodies past this are parsed in the parser process


class BodyError(ValueError):
    """A body that is not a bounded JSON object; `param` names the field at fault, if one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)
        self.message, self.param = message, param


def load(body: bytes) -> dict:
    """The body as a JSON object whose lists are within `LIST_LIMITS`. (The standard parser, so that a lone
    surrogate or a NaN reaches validation, which names the field.) Raises `BodyError`."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BodyError(f"request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise BodyError(f"request body: expected a JSON object, got {type(data).__name__}")
    for name, limit in LIST_LIMITS.items():
        value = data.get(name)
        if isinstance(value, (list, dict)) and len(value) > limit:
            raise BodyError(f"{name}: {len(value)} items, more than this server takes ({limit})", name)
    prompts = data.get("prompt")
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], list):  # lists of token ids
        total = sum(len(p) for p in prompts if isinstance(p, list))
        if total > LIST_LIMITS["prompt"]:
            raise BodyError(f"prompt: {total} token ids in all, more than this server takes ({LIST_LIMITS['prompt']})",
                            "prompt")
    for i, message in enumerate(data.get("messages") or ()):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and len(content) > MAX_CONTENT_PARTS:
            raise BodyError(f"messages.{i}.content: {len(content)} parts, more than this server takes "
                            f"({MAX_CONTENT_PARTS})", f"messages.{i}.content")
    return data


class BodyParser:
    """`await parser.load(body)`: `load` on the event loop for a small body, in the parser process for a large
    one. `close()` at shutdown."""

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None

    async def load(self, body: bytes) -> dict:
        if len(body) <= LARGE_BODY:
            return load(body)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, load, body)
        except BrokenProcessPool:  # the parser process died (killed, out of memory): a new one next time
            self._pool = None
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
