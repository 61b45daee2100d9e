"""Constrained decoding with llguidance: a JSON schema, any JSON object, or a tool-call syntax (a Lark grammar with
JSON-schema parts) compiled for the model's tokenizer; per sequence a `Constraint` whose token mask is applied to the
logits before the choice (`logits.Observe`) and which advances with each chosen token (`logits.ChooseToken`).

llguidance is an optional extra (`pip install moeshard[structured]`): without it, a request that needs a grammar is
refused with `GrammarError` (the server's 400) and nothing else changes. No HTTP and no model here.
K = sequences with a constraint in a step, V = vocabulary, W = 32-token words of a bitmask (ceil(V / 32)).
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Iterable

import torch

logger = logging.getLogger(__name__)

# Generated JSON is written as json.dumps writes it ({"a": 1, "b": [2, 3]}): no free whitespace, so that a model cannot
# pad an answer with newlines or spaces until it runs out of tokens (what weak models do under a flexible grammar).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}  # response_format {"type": "json_object"}


class GrammarError(ValueError):
    """A grammar that cannot be used: an invalid or unsupported schema, or llguidance not installed."""


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError:
        raise GrammarError("structured output and forced tool calls need llguidance, which is not installed: "
                           "pip install 'moeshard[structured]'") from None
    return llguidance


def json_schema_lark(schema: dict) -> str:
    """A Lark rule body that matches `schema` as this module writes JSON, for use inside a larger grammar."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


class Constraint:
    """One sequence's place in its grammar: which tokens may come next, advanced by each token chosen. Used on the
    batching thread only, after it is made."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.failed = False  # a chosen token the grammar refused (logged once): from then on only EOS is allowed

    def advance(self, token: int) -> None:
        if not self.failed and not self.matcher.consume_token(token):
            self.failed = True
            logger.warning("constrained decoding: token %d was refused by the grammar (%s); ending the sequence",
                           token, self.matcher.get_error()[:200])


class Grammars:
    """llguidance for one tokenizer: compiles grammars (checked against it) and starts a `Constraint` per sequence.
    The tokenizer's llguidance form is built on first use (a second or so for a 150k vocabulary), once."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Iterable[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._executor = None
        self.active: dict[str, Constraint] = {}  # request id -> its constraint, while it is in the batch

    def of(self, request_id: str) -> Constraint | None:
        return self.active.get(request_id)

    def _ready(self):
        ll = _llguidance()
        with self._lock:
            if self._ll_tokenizer is None:
                try:
                    self._ll_tokenizer = ll.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                              eos_token=self.eos_ids or None)
                except ValueError as exc:  # e.g. a slow (Python) tokenizer
                    raise GrammarError(f"constrained decoding needs a fast tokenizer: {exc}") from None
                self._executor = ll.LLExecutor()
        return ll

    def json_schema(self, schema: dict | None) -> str:
        """A grammar for JSON that validates against `schema` (None: any JSON object)."""
        ll = self._ready()
        try:
            grammar = ll.LLMatcher.grammar_from_json_schema(ANY_OBJECT if schema is None else schema,
                                                            overrides=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(f"not a JSON schema: {exc}") from None
        return self._checked(ll, grammar)

    def lark(self, text: str) -> str:
        """A grammar from Lark text (llguidance's dialect: `%json {...}` rules, `<[id]>` for a special token)."""
        ll = self._ready()
        return self._checked(ll, ll.LLMatcher.grammar_from_lark(text))

    def _checked(self, ll, grammar: str) -> str:
        error = ll.LLMatcher.validate_grammar(grammar, self._ll_tokenizer)
        if error and not error.startswith("WARNING"):
            raise GrammarError(f"the schema cannot be used for constrained decoding: {error[:500]}")
        return grammar

    def special_token(self, text: str) -> int | None:
        """The id of `text` when the tokenizer has it as one added token (a grammar names it as `<[id]>`: llguidance
        matches added tokens by id, never by their text)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] in getattr(self.tokenizer, "added_tokens_decoder", {}):
            return ids[0]
        return None

    def start(self, grammar: str) -> Constraint:
        """A new sequence's constraint (may take a while for a large schema: call it off the event loop)."""
        ll = self._ready()
        matcher = ll.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar cannot be used: {matcher.get_error()[:500]}")
        return Constraint(matcher)

    def allowed(self, constraints: list[Constraint], width: int) -> torch.Tensor:
        """Which tokens each constraint allows next, [K, width] bool; computed together (llguidance's threads). A
        constraint that failed, or allows nothing, allows EOS only: the choice always has a token to take."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.zeros(len(constraints), words, dtype=torch.int32)  # [K, W]
        live = [(c.matcher, row) for row, c in enumerate(constraints) if not c.failed]
        if live:
            self._executor.unsafe_compute_mask_ptr(live, bitmask.data_ptr(), words * 4, len(constraints))
        bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1  # [K, W, 32]
        allowed = torch.zeros(len(constraints), width, dtype=torch.bool)
        n = min(width, words * 32)
        allowed[:, :n] = bits.reshape(len(constraints), -1)[:, :n].bool()
        empty = ~allowed.any(dim=-1)  # [K]
        if empty.any() and self.eos_ids:
            allowed[empty.nonzero().flatten().unsqueeze(-1), torch.tensor(self.eos_ids)] = True
        return allowed
