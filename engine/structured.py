"""Structured output: a request's `ResponseFormat` compiled to a grammar, and each step's token masks.

The grammar engine is llguidance (guidance-ai; vLLM's "guidance" structured-output backend, optional in
llama.cpp): a Rust library whose wheel needs nothing else from Python (no torch of its own), that parses
JSON schemas, regular expressions and Lark grammars (tool calls' among them: service/tool_calls.py).
It computes each token mask on demand from an Earley parser and a token trie instead of precomputing
masks over the vocabulary, so a grammar is ready in milliseconds even for a large schema (README,
"Structured output"), where xgrammar and outlines-core spend their compile time building per-state
vocabulary masks.

Compiling happens on the caller's thread (the server's tokenizer threads), never the engine loop's, and
is cached by format; each request gets its own matcher, a cheap copy of the compiled one. A matcher
allows an end-of-sequence token only where the grammar accepts, and nothing else once it is complete.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Collection

import llguidance
import llguidance.hf
import numpy as np
import torch

from engine.errors import InvalidRequestError
from engine.request import ResponseFormat

GRAMMAR_CACHE_SIZE = 256  # compiled formats kept; a matcher copy costs microseconds, a compile milliseconds
# A JSON schema's output has no whitespace between tokens (a schema's "x-guidance" may say otherwise):
# whitespace is where a model could wander forever without breaking the grammar.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarMatcher:
    """One sequence's place in its grammar: which tokens may come next, and the tokens taken so far."""

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, eos_token_ids: Collection[int]
    ) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos_token_ids = eos_token_ids
        self.done = False  # an end-of-sequence token was taken: the grammar is complete

    def allowed(self) -> np.ndarray | None:
        """A bool mask [vocab] of the tokens that may come next; None once done (nothing to constrain)."""
        if self.done or self._matcher.is_error():
            return None
        # Token i is bit i % 8 of byte i // 8.
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, count=self._vocab_size, bitorder="little").view(np.bool_)

    def accept(self, token_id: int) -> None:
        """Take the token sampled under `allowed()`."""
        if self.done:
            return
        self.done = token_id in self._eos_token_ids
        if not self.done:
            assert self._matcher.consume_token(token_id), self._matcher.get_error()


class GrammarCompiler:
    """Compiles response formats for one tokenizer, thread-safe and cached by format (least recently used)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Collection[int]) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = frozenset(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None  # built at the first compile (about a second)
        self._tokenizer_lock = threading.Lock()
        self._lock = threading.Lock()  # the cache's, never held while compiling
        self._cache: OrderedDict[ResponseFormat, llguidance.LLMatcher] = OrderedDict()

    def compile(self, response_format: ResponseFormat) -> llguidance.LLMatcher:
        """The compiled grammar of `response_format` (from the cache when there); raises `InvalidRequestError`
        naming the field when the schema, regex or choice cannot be compiled."""
        with self._lock:
            compiled = self._cache.get(response_format)
            if compiled is not None:
                self._cache.move_to_end(response_format)
                return compiled
        field, grammar = _grammar(response_format)
        compiled = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if compiled.is_error():  # llguidance reports a grammar it cannot build this way, never by raising
            raise InvalidRequestError(field, f"cannot be compiled: {compiled.get_error().strip()}")
        with self._lock:
            self._cache[response_format] = compiled
            if len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, response_format: ResponseFormat) -> GrammarMatcher:
        """A new sequence's matcher for `response_format` (compiled here unless cached)."""
        return GrammarMatcher(
            self.compile(response_format).deep_copy(), self._vocab_size, self._eos_token_ids
        )

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                eos = sorted(self._eos_token_ids)
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, self._vocab_size, eos)
            return self._tokenizer


def _grammar(response_format: ResponseFormat) -> tuple[str, str]:
    """(the engine field path, the llguidance grammar) of a format that `engine.limits` found well formed."""
    field = "sampling.response_format"
    if response_format.json_schema is not None:
        try:
            schema = json.loads(response_format.json_schema)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{field}.json_schema", f"is not valid JSON: {e}") from e
        if not isinstance(schema, dict | bool):
            raise InvalidRequestError(f"{field}.json_schema", "must be a JSON object (a JSON schema)")
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        return f"{field}.json_schema", grammar
    if response_format.regex is not None:
        return f"{field}.regex", llguidance.LLMatcher.grammar_from_regex(response_format.regex)
    if response_format.lark is not None:
        return f"{field}.lark", llguidance.LLMatcher.grammar_from_lark(response_format.lark)
    assert response_format.choice is not None
    lark = "start: " + " | ".join(json.dumps(choice) for choice in response_format.choice)
    return f"{field}.choice.choices", llguidance.LLMatcher.grammar_from_lark(lark)


def allowed_tokens(
    matchers: list[GrammarMatcher | None], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """The bool mask [rows, vocab] of a step's sampling rows: a row without a matcher allows every token."""
    allowed = np.ones((len(matchers), vocab_size), dtype=np.bool_)
    for i, matcher in enumerate(matchers):
        row = matcher.allowed() if matcher is not None else None
        if row is not None:
            allowed[i] = row
    return torch.from_numpy(allowed).to(device)
