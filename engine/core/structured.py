"""Structured output: a request's `ResponseFormat` compiled to a grammar, and each step's token masks.

The grammar engine is llguidance (guidance-ai; vLLM's "guidance" structured-output backend, optional in
llama.cpp): a Rust library whose wheel needs nothing else from Python (no torch of its own), that parses
JSON schemas, regular expressions and Lark grammars. It computes each token mask on demand from
an Earley parser and a token trie instead of precomputing masks over the vocabulary, so a grammar is
ready in milliseconds even for a large schema (README, "Structured output"), where xgrammar and
outlines-core spend their compile time building per-state vocabulary masks.

Compiling happens on the caller's thread (the server's tokenizer threads), never the engine loop's, and
is cached by format; each request gets its own matcher, a cheap copy of the compiled one. A matcher
allows an end-of-sequence token only where the grammar accepts, and nothing else once it is complete.

Each step's masks are computed on grammar worker threads while the model runs, within explicit limits
(`PARSER_LIMITS`), and a step does not wait long for them: a row whose mask is not ready soon after the
forward pass sits the step out and is sampled from its logits once its mask is ready, its mask computed
from then on at the lowest CPU priority (it takes only what the model leaves). A grammar that fails, or
whose mask takes more CPU than the budget, fails only its own request (`GrammarLimitError`,
INVALID_ARGUMENT); a slow one slows only its own request, never its batchmates (README, "Structured
output").
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

import llguidance
import llguidance.hf
import numpy as np
import torch

from engine.errors import GrammarLimitError, InvalidRequestError
from engine.request import ResponseFormat

GRAMMAR_CACHE_SIZE = 256  # compiled formats kept; a matcher copy costs microseconds, a compile milliseconds
# A JSON schema's output has no whitespace between tokens (a schema's "x-guidance" may say otherwise):
# whitespace is where a model could wander forever without breaking the grammar.
JSON_OPTIONS = {"whitespace_flexible": False}

# Explicit bounds on one matcher's work (llguidance's ParserLimits: its defaults, but for fewer lexer
# states and terse errors). Whatever the grammar, a mask or a token's advance costs at most about 20 ms of
# one core; a grammar that needs more fails its own request (`GrammarLimitError`), as does one that builds
# too large a lexer (`(a|aa){300,3000}b` does at its first token) or an Earley row too wide.
PARSER_LIMITS = dict(
    max_items_in_row=2_000,  # the branching of one grammar row
    initial_lexer_fuel=1_000_000,  # building the lexer's first regexes (about 50k a millisecond)
    step_lexer_fuel=200_000,  # lexer work of one mask (about 14k a millisecond)
    step_max_items=50_000,  # Earley items of one mask (about 20k a millisecond)
    max_lexer_states=50_000,  # lexer states of one grammar (its requests share them), 1-2 kB each
    max_grammar_size=500_000,  # symbols in the grammar's productions
    verbose_errors=False,  # the parser's state and the grammar stay out of the messages clients get
)
_LIMITS = llguidance.LLParserLimits(**PARSER_LIMITS)
_NOT_VERBOSE = "<non-verbose/>"  # what llguidance puts where the details would be
# How much CPU time a row's mask may take before its request fails (measured on its grammar thread, which
# a busy machine may keep waiting: that slows the request, it does not fail it): a backstop to
# PARSER_LIMITS, which keep a mask to tens of milliseconds. A mask whose thread is stuck fails after
# GRAMMAR_WALL_FACTOR times the budget on the clock.
GRAMMAR_STEP_BUDGET_MS = 500.0
GRAMMAR_WALL_FACTOR = 20
GRAMMAR_THREADS = 4  # each row's mask is one task; llguidance releases the GIL, so they run in parallel
# After its forward pass a step waits for its rows' masks at most this share of the time the pass took
# (at least GRAMMAR_MIN_WAIT_MS): enough for ordinary masks, computed beside the pass, while a slow
# grammar's row sits the step out instead of holding every batchmate.
GRAMMAR_WAIT_SHARE = 0.25
GRAMMAR_MIN_WAIT_MS = 0.5
# The niceness of a grammar thread whose mask is late (Linux: per thread): on a CPU the model's threads use
# every core, and slow grammar work a client chose must not take cores from everyone's forward pass.
GRAMMAR_THREAD_NICE = 19


class GrammarMatcher:
    """One sequence's place in its grammar: which tokens may come next, and the tokens taken so far.

    `accept` only records the token taken; `fill_mask` consumes it and computes the next mask, on a grammar
    worker thread (`GrammarWorkers`), so that both halves of a row's grammar work run there, timed together.
    A matcher that cannot go on (over its limits, or any fault of the grammar engine) sets `error` and stays
    failed; only its own request ends (`limit_error`).
    """

    def __init__(
        self,
        compiled: llguidance.LLMatcher,
        field: str,
        vocab_size: int,
        eos_token_ids: Collection[int],
        on_unusable: Callable[[str], None] = lambda error: None,
    ) -> None:
        self.field = field  # the request's format field (engine path): where its error points
        self._on_unusable = on_unusable  # told when the grammar fails before any output: see `_fail`
        self.done = False  # an end-of-sequence token was taken: the grammar is complete
        self.error: str | None = None  # why the grammar engine can go no further
        self._compiled = compiled  # the compiled grammar, never advanced: what `fork` starts from
        self._matcher = compiled.deep_copy()
        self._vocab_size = vocab_size
        self._eos_token_ids = eos_token_ids
        self._pending: int | None = None  # the token taken, consumed with the next mask
        self._num_taken = 0  # output tokens taken, the end-of-sequence one aside
        # The next mask, being computed on a grammar worker (`GrammarWorkers.start`): it stays in flight
        # across steps while its row waits for it, and is never started twice.
        self.mask = np.empty(_mask_words(vocab_size), dtype=np.int32)
        self.task: Future | None = None
        self.task_started = 0.0  # time.monotonic() when `task` was submitted
        self.task_cpu: tuple[int, float] | None = None  # its thread's CPU clock, and its reading at the start
        self.task_thread: int | None = None  # the native id of the thread computing it, while one is

    @property
    def active(self) -> bool:
        """Whether the next token still needs this grammar's mask."""
        return not self.done and self.error is None

    def fork(self) -> GrammarMatcher:
        """A matcher of the same grammar at its start, for another completion of the same request."""
        return GrammarMatcher(
            self._compiled, self.field, self._vocab_size, self._eos_token_ids, self._on_unusable
        )

    def accept(self, token_id: int) -> None:
        """Take the token sampled under the last mask; the grammar consumes it with the next `fill_mask`."""
        assert self.task is None, "a token is taken only once its mask was used"
        if self.done:
            return
        self.done = token_id in self._eos_token_ids
        if not self.done:
            self._pending = token_id
            self._num_taken += 1

    def fill_mask(self, out: np.ndarray) -> None:
        """Consume the token taken, then write the mask of the tokens allowed next into `out`: int32 words,
        token i is bit i % 32 of word i // 32. Sets `error` instead when the grammar cannot go on.

        llguidance releases the GIL throughout, so rows run in parallel on the grammar workers; its limits
        (`PARSER_LIMITS`) bound the work of one call whatever the grammar."""
        try:
            if self._pending is not None:
                token_id, self._pending = self._pending, None
                if not self._matcher.consume_token(token_id):
                    self._fail()
                    return
            self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
            if self._matcher.is_error():
                self._fail()
        except Exception as exc:  # a fault of the grammar engine is this request's alone
            self._fail(f"the grammar engine failed: {exc}")

    def limit_error(self) -> GrammarLimitError:
        """The error that ends this matcher's request, naming its format field."""
        where = f"at output token {self._num_taken}" if self._num_taken else "before any output"
        return GrammarLimitError(self.field, f"{self.error} ({where})")

    def allowed(self) -> np.ndarray | None:
        """A bool mask [vocab] of the tokens that may come next, computed on the caller's thread; None once
        done. Raises `GrammarLimitError` when the grammar cannot go on."""
        if self.done:
            return None
        words = np.empty(_mask_words(self._vocab_size), dtype=np.int32)
        self.fill_mask(words)
        if self.error is not None:
            raise self.limit_error()
        return _unpack(words[None, :], self._vocab_size)[0]

    def _fail(self, error: str | None = None) -> None:
        self.error = error or f"the grammar engine stopped: {_error_message(self._matcher)}"
        if self._num_taken == 0:  # no output yet: the format itself fails, for every request that uses it
            self._on_unusable(self.error)


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
        # Formats whose grammar failed before any output (the lexer a format's matchers share went over its
        # limits): refused at admission from then on, so they cost no prefill and no step of anyone's.
        self._unusable: OrderedDict[ResponseFormat, str] = OrderedDict()

    def compile(self, response_format: ResponseFormat) -> llguidance.LLMatcher:
        """The compiled grammar of `response_format` (from the cache when there); raises `InvalidRequestError`
        naming the field when the schema, regex or choice cannot be compiled, `GrammarLimitError` when a
        request of this format already failed before any output."""
        with self._lock:
            unusable = self._unusable.get(response_format)
            if unusable is not None:
                message = f"{unusable} (a request of this format already failed before any output)"
                raise GrammarLimitError(_field(response_format), message)
            compiled = self._cache.get(response_format)
            if compiled is not None:
                self._cache.move_to_end(response_format)
                return compiled
        grammar = _grammar(response_format)
        compiled = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0, limits=_LIMITS)
        if compiled.is_error():  # llguidance reports a grammar it cannot build this way, never by raising
            message = f"cannot be compiled: {_error_message(compiled)}"
            raise InvalidRequestError(_field(response_format), message)
        with self._lock:
            self._cache[response_format] = compiled
            if len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, response_format: ResponseFormat) -> GrammarMatcher:
        """A new sequence's matcher for `response_format` (compiled here unless cached)."""
        compiled = self.compile(response_format)
        field, unusable = _field(response_format), partial(self._mark_unusable, response_format)
        return GrammarMatcher(compiled, field, self._vocab_size, self._eos_token_ids, unusable)

    def _mark_unusable(self, response_format: ResponseFormat, error: str) -> None:
        with self._lock:  # called from the grammar workers
            self._cache.pop(response_format, None)
            self._unusable[response_format] = error
            if len(self._unusable) > GRAMMAR_CACHE_SIZE:
                self._unusable.popitem(last=False)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                eos = sorted(self._eos_token_ids)
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, self._vocab_size, eos)
            return self._tokenizer


def _field(response_format: ResponseFormat) -> str:
    """The engine field path of the format's one set field."""
    if response_format.json_schema is not None:
        return "sampling.response_format.json_schema"
    if response_format.regex is not None:
        return "sampling.response_format.regex"
    if response_format.lark is not None:
        return "sampling.response_format.lark"
    return "sampling.response_format.choice.choices"


def _grammar(response_format: ResponseFormat) -> str:
    """The llguidance grammar of a format that `engine.frontend.limits` found well formed."""
    if response_format.json_schema is not None:
        field = _field(response_format)
        try:
            schema = json.loads(response_format.json_schema)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(field, f"is not valid JSON: {e}") from e
        if not isinstance(schema, dict | bool):
            raise InvalidRequestError(field, "must be a JSON object (a JSON schema)")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if response_format.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(response_format.regex)
    if response_format.lark is not None:
        return llguidance.LLMatcher.grammar_from_lark(response_format.lark)
    assert response_format.choice is not None
    lark = "start: " + " | ".join(json.dumps(choice) for choice in response_format.choice)
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _error_message(matcher: llguidance.LLMatcher) -> str:
    return matcher.get_error().replace(_NOT_VERBOSE, "").strip()


def _mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _unpack(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """Bool masks [rows, vocab] from bitmasks [rows, words] (token i: bit i % 32 of word i // 32)."""
    bits = np.unpackbits(words.view(np.uint8), axis=1, count=vocab_size, bitorder="little")
    return bits.view(np.bool_)


class GrammarWorkers:
    """Threads that do the grammar work of a step's rows: one task per constrained row, all rows in parallel
    and beside the model's forward pass (llguidance releases the GIL).

    A row whose mask is not ready a little after the forward pass (`StepMasks.result`) is deferred: its task
    stays in flight on its matcher, and the row is sampled from its logits by a later step once the mask is
    ready (`ready`). The thread computing a late mask is demoted to the lowest CPU priority
    (`GRAMMAR_THREAD_NICE`): from then on it takes only the CPU the model leaves, and it leaves the pool once
    its task is done (the next `start` brings in a thread at the loop's priority in its place), so ordinary
    masks keep running beside the forward pass at full speed. A grammar that fails, or whose mask takes more
    CPU than `budget_ms`, fails its own request alone; a task whose request failed finishes on its own (its
    work is bounded by `PARSER_LIMITS`). (llguidance's `LLExecutor` computes a batch of masks in parallel too,
    but in one call that returns when the slowest row is done: one slow grammar would hold every row.)
    """

    def __init__(self, budget_ms: float = GRAMMAR_STEP_BUDGET_MS, num_threads: int = GRAMMAR_THREADS) -> None:
        self.budget_ms = budget_ms
        self.num_threads = num_threads
        self._queue: queue.SimpleQueue[tuple[Future, GrammarMatcher] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._num_workers = 0  # threads at the loop's priority, taking tasks
        self._demoted: set[int] = set()  # native ids of the threads that leave after their task

    def start(self, matchers: list[GrammarMatcher | None], vocab_size: int) -> StepMasks:
        """Start the masks of a step's sampling rows (None: a row without a grammar); a matcher whose mask is
        in flight already keeps it."""
        self._staff()
        for matcher in matchers:
            if matcher is not None and matcher.active and matcher.task is None:
                matcher.task_started, matcher.task_cpu = time.monotonic(), None
                matcher.task = Future()
                self._queue.put((matcher.task, matcher))
        return StepMasks(matchers, vocab_size, self)

    def demote(self, matcher: GrammarMatcher) -> None:
        """Lower the CPU priority of the thread computing `matcher`'s mask, if one is (Linux)."""
        with self._lock:
            thread = matcher.task_thread
            if thread is None or thread in self._demoted or not _renice(thread):
                return
            self._demoted.add(thread)
            self._num_workers -= 1

    def close(self) -> None:
        """Stop the threads once their tasks are done; tasks not started are dropped."""
        with self._lock:
            count, self._num_workers = self._num_workers, self.num_threads  # no thread is added any more
        for _ in range(count):
            self._queue.put(None)

    def _staff(self) -> None:
        """Bring the pool back to `num_threads` threads, started here: a new thread takes its creator's
        priority, the loop's."""
        with self._lock:
            missing = self.num_threads - self._num_workers
            self._num_workers += missing
        for _ in range(missing):
            threading.Thread(target=self._work, name="textgen-grammar", daemon=True).start()

    def _work(self) -> None:
        me = threading.get_native_id()
        while (item := self._queue.get()) is not None:
            future, matcher = item
            if not future.set_running_or_notify_cancel():
                continue
            matcher.task_thread = me
            try:
                _fill_mask(matcher)
            finally:
                with self._lock:
                    matcher.task_thread = None
                    demoted = me in self._demoted
                    self._demoted.discard(me)
                future.set_result(None)
            if demoted:
                return


def _fill_mask(matcher: GrammarMatcher) -> None:
    """A grammar worker's task: the matcher's next mask, into its own buffer, its CPU time on the clock."""
    clock = _thread_cpu_clock()
    if clock is not None:
        matcher.task_cpu = (clock, time.clock_gettime(clock))
    matcher.fill_mask(matcher.mask)


def _thread_cpu_clock() -> int | None:
    """The calling thread's CPU-time clock, where the platform has one."""
    if not hasattr(time, "pthread_getcpuclockid"):
        return None
    return time.pthread_getcpuclockid(threading.get_ident())


def _renice(thread: int) -> bool:
    """Set thread `thread` (a native id) to `GRAMMAR_THREAD_NICE`: a thread's own niceness on Linux (elsewhere
    niceness is the whole process's: nothing changes); whether it did."""
    if sys.platform != "linux":
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, thread, GRAMMAR_THREAD_NICE)
    except OSError:  # the thread ended, or this is not allowed here
        return False
    return True


@dataclass(slots=True)
class StepMasks:
    """One step's grammar masks, being computed by `GrammarWorkers`."""

    matchers: list[GrammarMatcher | None]
    vocab_size: int
    workers: GrammarWorkers

    def result(
        self, device: torch.device, wait_s: float
    ) -> tuple[torch.Tensor, dict[int, GrammarLimitError], set[int]]:
        """The bool mask [rows, vocab] of the tokens each row may sample, the rows whose grammar failed, and
        the rows deferred (by index): their masks were not ready within `wait_s`. A failed or deferred row's
        token is thrown away: its mask allows everything rather than nothing."""
        pending = [m.task for m in self.matchers if m is not None and m.task is not None]
        futures.wait(pending, timeout=wait_s)
        words = np.full((len(self.matchers), _mask_words(self.vocab_size)), -1, dtype=np.int32)
        failed: dict[int, GrammarLimitError] = {}
        deferred: set[int] = set()
        for i, matcher in enumerate(self.matchers):
            if matcher is None:
                continue
            state = _take_mask(matcher, words[i], self.workers.budget_ms)
            if state == "failed":
                failed[i] = matcher.limit_error()
            elif state == "deferred":
                deferred.add(i)
                self.workers.demote(matcher)
        allowed = _unpack(words, self.vocab_size)
        if failed or deferred:
            allowed[list(failed.keys() | deferred)] = True
        return torch.from_numpy(allowed).to(device), failed, deferred


def ready(matcher: GrammarMatcher, workers: GrammarWorkers) -> bool:
    """Whether a deferred row's mask is done, or its grammar failed or ran out of time: its row can be
    settled now. A mask still being computed is demoted (it may have started since it was deferred)."""
    task = matcher.task
    if task is None or task.done() or _late(matcher, workers.budget_ms):
        return True
    workers.demote(matcher)
    return False


def settle(
    matcher: GrammarMatcher, vocab_size: int, budget_ms: float
) -> tuple[np.ndarray | None, GrammarLimitError | None]:
    """A `ready` deferred row's bool mask [vocab] of the tokens it may sample, or the error that ends its
    request."""
    words = np.full((1, _mask_words(vocab_size)), -1, dtype=np.int32)
    if _take_mask(matcher, words[0], budget_ms) == "failed":
        return None, matcher.limit_error()
    return _unpack(words, vocab_size)[0], None


def _late(matcher: GrammarMatcher, budget_ms: float) -> bool:
    """Whether the matcher's mask in flight has used more than `budget_ms` of CPU (the clock where its
    thread's CPU time cannot be read), or is stuck past `GRAMMAR_WALL_FACTOR` times that."""
    wall_ms = (time.monotonic() - matcher.task_started) * 1000
    if wall_ms > GRAMMAR_WALL_FACTOR * budget_ms:
        return True
    cpu = matcher.task_cpu
    if cpu is None:  # not started (or no CPU clock here: the clock decides)
        return _thread_cpu_clock() is None and wall_ms > budget_ms
    clock, start = cpu
    try:
        return (time.clock_gettime(clock) - start) * 1000 > budget_ms
    except OSError:  # its thread ended (a demoted one leaves) since the caller saw the task running: done
        return False


def _take_mask(matcher: GrammarMatcher, out: np.ndarray, budget_ms: float) -> str:
    """Copy `matcher`'s finished mask into `out` and clear its task: "ok" (`out` left as it is when no mask
    was needed: the grammar is complete), "failed" (its request ends), or "deferred" (in flight, within the
    budget)."""
    task = matcher.task
    if task is not None and not task.done():
        if not _late(matcher, budget_ms):
            return "deferred"
        matcher.error = f"the grammar took longer than the per-step budget of {budget_ms:g} ms"
    if matcher.error is not None:
        return "failed"
    if task is None:
        return "ok"
    matcher.task = None
    out[:] = matcher.mask
    return "ok"
