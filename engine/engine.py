"""The engine: a step loop on its own thread that serves submitted requests with continuous batching."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from engine.batching import BatchConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import (
    DeadlineExceededError,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    RequestCancelledError,
    RequestFailedError,
)
from engine.model_runner import ModelRunner, StepInput
from engine.observer import EngineObserver
from engine.request import (
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    StoppingParams,
    Timing,
    TokenInfo,
)
from engine.sampler import SamplingBatch, sample
from engine.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from engine.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs to start; `model=None` is the default SmolLM2 model."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch: BatchConfig = field(default_factory=BatchConfig)
    max_queue_size: int = 1024
    num_kv_blocks: int = 0  # 0: sized from free memory (CUDA) or 1 GiB (CPU)
    kv_block_size: int = 16
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 4096
    max_model_len: int = 0  # 0: the model's own context length
    scheduling: str = "continuous"
    max_decode_stall_ms: float = 200.0
    attention_backend: str = "auto"  # decode attention: auto, torch (gathers blocks), cpu or triton (kernels)
    weight_format: str = "auto"  # "fp16-packed": CPU linear layers on FBGEMM's float16 GEMM; "native"
    prefill_chunk_tokens: int = -1  # most tokens per forward pass of a prefill step; -1: 512 on CPU, 0: all


@dataclass(slots=True)
class ModelInfo:
    """What clients may want to know about the served model."""

    name: str
    max_context_len: int
    vocab_size: int
    eos_token_ids: list[int]
    device: str
    dtype: str
    kv_block_size: int
    num_kv_blocks: int


@dataclass(slots=True)
class GenerationResult:
    """The whole output of one request from the offline `Engine.generate()`."""

    request_id: str
    text: str
    token_ids: list[int]
    tokens: list[TokenInfo]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timing: Timing


class _AsyncSink:
    """Delivers a request's events to an asyncio queue on the loop that submitted it."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class Engine:
    """Continuous-batching generation engine. `submit`/`cancel` are safe to call from any asyncio loop."""

    def __init__(self, config: EngineConfig | None = None, observer: EngineObserver | None = None) -> None:
        self.config = config = config or EngineConfig()
        # All torch work (loading, every step) happens on the loop thread. With libgomp, a second
        # thread that runs parallel torch ops gets its own OpenMP team, and on a small CPU the two teams
        # make every later op about twice as slow (a SmolLM2 decode step of one sequence: ~40 ms when
        # one thread does everything, ~85 ms when the model was loaded on another thread).
        self._go = threading.Event()
        self._stop = False
        self.model_runner = self._start_thread_and_load(config)
        self.tokenizer = self.model_runner.tokenizer
        self.observer = observer or EngineObserver()
        self.scheduler = Scheduler(
            SchedulerConfig(config.batch, config.max_decode_stall_ms, config.scheduling),
            self.model_runner.allocator,
        )
        runner = self.model_runner
        max_len = runner.max_context_len
        self.max_context_len = min(max_len, config.max_model_len) if config.max_model_len > 0 else max_len
        self.eos_token_ids = self._eos_token_ids()
        self._special_ids = set(self.tokenizer.all_special_ids)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._live: dict[str, Sequence] = {}
        self._cancelled: dict[str, Exception] = {}
        self._accepting = True

    # ---- public API -------------------------------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        runner = self.model_runner
        return ModelInfo(
            name=runner.name,
            max_context_len=self.max_context_len,
            vocab_size=runner.vocab_size,
            eos_token_ids=list(self.eos_token_ids),
            device=str(runner.device),
            dtype=str(runner.dtype).removeprefix("torch."),
            kv_block_size=runner.block_size,
            num_kv_blocks=runner.allocator.num_blocks,
        )

    @property
    def num_kv_blocks(self) -> int:
        return self.model_runner.allocator.num_blocks

    @property
    def num_free_kv_blocks(self) -> int:
        return self.model_runner.allocator.num_free

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Render chat messages with the model's template, ready for the assistant's reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("chat", "this model has no chat template; send a prompt instead")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def start(self) -> None:
        """Warm the model up and start the step loop (idempotent)."""
        if self._go.is_set():
            return
        self._ensure_thread()
        self.generate([[self._warmup_token()]], stopping=StoppingParams(max_new_tokens=2, ignore_eos=True))

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; requests already submitted carry on."""
        self._accepting = False

    def shutdown(self) -> None:
        """Stop the step loop; requests still in flight fail."""
        self._accepting = False
        with self._wakeup:
            self._stop = True
            self._wakeup.notify()
        self._go.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def submit(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Queue a request; iterate the result for its events. Raises at once if it cannot be queued."""
        sink = _AsyncSink(asyncio.get_running_loop())
        self._enqueue(request, sink)
        return self._events(request.request_id, sink.queue)

    async def _events(self, request_id: str, events: asyncio.Queue) -> AsyncIterator[GenerationEvent]:
        done = False
        try:
            while not done:
                item = await events.get()
                if isinstance(item, Exception):
                    done = True
                    raise item
                done = item.finished
                yield item
        finally:
            if not done:
                self.cancel(request_id)  # the consumer went away: free the request's KV blocks

    def cancel(self, request_id: str) -> None:
        """Cancel a queued or running request; its blocks are freed at the next step. Idempotent."""
        self._abort(request_id, RequestCancelledError(f"request {request_id} was cancelled"))

    def generate(
        self,
        prompts: list[str | list[int]],
        sampling: SamplingParams | list[SamplingParams] | None = None,
        stopping: StoppingParams | list[StoppingParams] | None = None,
    ) -> list[GenerationResult]:
        """Offline batch generation through the same engine loop (for examples, tests and benchmarks)."""
        self._ensure_thread()
        n = len(prompts)
        samplings = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * n
        stoppings = stopping if isinstance(stopping, list) else [stopping or StoppingParams()] * n
        sink: queue.Queue = queue.Queue()
        requests = []
        for prompt, sp, st in zip(prompts, samplings, stoppings, strict=True):
            ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            request = GenerationRequest(ids, sp, st)
            self._enqueue(request, sink)
            requests.append(request)
        collected: dict[str, list[GenerationEvent]] = {r.request_id: [] for r in requests}
        remaining = n
        while remaining:
            rid, item = sink.get()
            if isinstance(item, Exception):
                raise item
            collected[rid].append(item)
            remaining -= item.finished
        return [self._result(r.request_id, collected[r.request_id]) for r in requests]

    # ---- submission -------------------------------------------------------------------------------------

    def _enqueue(self, request: GenerationRequest, sink) -> None:
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and accepts no new requests")
        max_new_tokens = self._validate(request)
        if self.scheduler.num_waiting >= self.config.max_queue_size:
            raise QueueFullError(f"the queue is full ({self.config.max_queue_size} requests waiting)")
        seq = Sequence(
            request=request,
            max_new_tokens=max_new_tokens,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, request.prompt_ids, request.stopping.stop_sequences
            ),
            sink=sink,
            generator=self._generator(request.sampling),
        )
        with self._wakeup:
            if request.request_id in self._live:
                raise InvalidRequestError("request_id", f"{request.request_id!r} is already in flight")
            self.observer.request_queued(seq)  # before the loop thread can see the sequence
            self._live[request.request_id] = seq
            self.scheduler.add(seq)
            self._wakeup.notify()

    def _validate(self, request: GenerationRequest) -> int:
        """Check everything that can be checked up front; return the effective max_new_tokens."""
        ids, sp, st = request.prompt_ids, request.sampling, request.stopping
        if not ids:
            raise InvalidRequestError("prompt", "must not be empty")
        vocab = self.model_runner.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError("input_ids", f"token ids must be in [0, {vocab})")
        if st.max_new_tokens < 0 or st.max_new_tokens > self.config.max_new_tokens_limit:
            limit = self.config.max_new_tokens_limit
            raise InvalidRequestError("stopping.max_new_tokens", f"must be between 0 and {limit}")
        max_new = st.max_new_tokens or self.config.default_max_new_tokens
        if st.max_new_tokens == 0:
            max_new = min(max_new, self.max_context_len - len(ids))  # the default shrinks to fit
        if max_new < 1 or len(ids) + max_new > self.max_context_len:
            raise InvalidRequestError(
                "stopping.max_new_tokens",
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new}) exceeds the model's context of "
                f"{self.max_context_len} tokens",
            )
        allocator = self.model_runner.allocator
        if allocator.blocks_needed(len(ids) + max_new) > allocator.num_blocks:
            raise InvalidRequestError(
                "stopping.max_new_tokens", "prompt + max_new_tokens exceeds the KV cache"
            )
        if len(st.stop_sequences) > MAX_STOP_SEQUENCES:
            raise InvalidRequestError("stopping.stop_sequences", f"at most {MAX_STOP_SEQUENCES} allowed")
        if any(not s or len(s) > MAX_STOP_SEQUENCE_CHARS for s in st.stop_sequences):
            raise InvalidRequestError(
                "stopping.stop_sequences", f"each must have 1 to {MAX_STOP_SEQUENCE_CHARS} characters"
            )
        _validate_sampling(sp)
        return max_new

    def _generator(self, sp: SamplingParams) -> torch.Generator | None:
        if sp.greedy:
            return None
        generator = torch.Generator(device=self.model_runner.device)
        if sp.seed is not None:
            generator.manual_seed(sp.seed)
        else:
            generator.seed()
        return generator

    def _abort(self, request_id: str, error: Exception) -> None:
        with self._wakeup:
            if request_id in self._live:
                self._cancelled.setdefault(request_id, error)
                self._wakeup.notify()

    # ---- the step loop ------------------------------------------------------------------------------------

    def _start_thread_and_load(self, config: EngineConfig) -> ModelRunner:
        """Start the loop thread, which loads the model and then waits for `_ensure_thread`."""
        loaded: list[ModelRunner | BaseException] = []
        ready = threading.Event()

        def main() -> None:
            try:
                loaded.append(
                    ModelRunner(
                        config.model,
                        config.device,
                        config.dtype,
                        config.num_kv_blocks,
                        config.kv_block_size,
                        config.attention_backend,
                        config.weight_format,
                        config.prefill_chunk_tokens,
                    )
                )
            except BaseException as exc:  # handed to the constructor's thread, which raises it
                loaded.append(exc)
                return
            finally:
                ready.set()
            self._go.wait()
            self._loop()

        self._thread = threading.Thread(target=main, name="textgen-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if isinstance(loaded[0], BaseException):
            self._thread.join()
            raise loaded[0]
        return loaded[0]

    def _ensure_thread(self) -> None:
        self._go.set()

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._stop and not self._cancelled and not self.scheduler.has_work():
                    self._wakeup.wait(timeout=self._idle_timeout())
                if self._stop:
                    break
                cancelled, self._cancelled = self._cancelled, {}
            outbox: list[tuple[Sequence, object]] = []
            try:
                self._drop(cancelled, outbox)
                self._drop_expired(outbox)
                step = self.scheduler.schedule()
                if step is not None:
                    self._run_step(step, outbox)
            except Exception as exc:  # a bug outside the model step: fail what is in flight, keep serving
                log.exception("engine loop failed")
                self._fail_all(RequestFailedError(f"engine fault: {exc}"), outbox)
            self._dispatch(outbox)
        outbox = []
        self._fail_all(EngineStoppedError("the engine stopped"), outbox)
        self._dispatch(outbox)

    def _idle_timeout(self) -> float | None:
        """How long an idle loop may sleep: until the oldest queued request reaches max_wait_ms."""
        waited = self.scheduler.batcher.peek_oldest_wait()
        if waited is None:
            return None
        return max(self.config.batch.max_wait_ms / 1000 - waited, 0.001)

    def _drop(self, errors: dict[str, Exception], outbox: list) -> None:
        for request_id, error in errors.items():
            seq = self._live.get(request_id)
            if seq is not None:
                self._end(seq, outbox, error)

    def _live_sequences(self) -> list[Sequence]:
        with self._lock:  # submit() adds to the dict from other threads
            return list(self._live.values())

    def _drop_expired(self, outbox: list) -> None:
        now = time.monotonic()
        for seq in [s for s in self._live_sequences() if s.expired(now)]:
            self._end(seq, outbox, DeadlineExceededError(f"request {seq.id} passed its deadline"))

    def _run_step(self, step: ScheduledStep, outbox: list) -> None:
        for seq in step.preempted:
            self.observer.request_preempted(seq)
        start = time.monotonic()
        try:
            sampled = self._forward_and_sample(step)
        except Exception as exc:  # an engine fault fails only the requests of this step
            log.exception("engine step failed")
            for seq, _ in step.chunks:
                self._end(seq, outbox, RequestFailedError(f"engine fault: {exc}"))
            return
        for seq, token_id, logprob in sampled:
            self._append_token(seq, token_id, logprob, outbox)
        allocator = self.model_runner.allocator
        kv_used = allocator.num_blocks - allocator.num_free
        self.observer.step_finished(step, start, time.monotonic(), kv_used, allocator.num_blocks)

    def _forward_and_sample(self, step: ScheduledStep) -> list[tuple[Sequence, int, float]]:
        inputs = []
        for seq, n in step.chunks:
            if step.is_prefill and seq.num_computed_tokens == 0:
                self.observer.request_admitted(seq)
            begin = seq.num_computed_tokens
            completes = begin + n == seq.num_tokens
            inputs.append(StepInput(seq.token_ids[begin : begin + n], begin, seq.block_table, completes))
        logits = self.model_runner.run(inputs, step.is_prefill)
        ready = [seq for (seq, n) in step.chunks if self.scheduler.finish_chunk(seq, n)]
        if not ready:
            return []
        batch = SamplingBatch(
            params=[s.request.sampling for s in ready],
            generators=[s.generator for s in ready],
            history=[s.token_ids for s in ready],
            outputs=[s.output_ids for s in ready],
        )
        token_ids, logprobs = sample(logits, batch)
        return list(zip(ready, token_ids.tolist(), logprobs.tolist(), strict=True))

    def _append_token(self, seq: Sequence, token_id: int, logprob: float, outbox: list) -> None:
        seq.token_ids.append(token_id)
        if seq.padding_only:
            if seq.num_tokens >= self.max_context_len:
                self.scheduler.finish(seq)
            return
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
            self.observer.first_token(seq)
        token_text = seq.detokenizer.add_token(token_id)
        token = TokenInfo(token_id, token_text, logprob, token_id in self._special_ids)
        if seq.detokenizer.stopped:
            seq.finish_reason = FinishReason.STOP_SEQUENCE
        elif token_id in self.eos_token_ids and not seq.request.stopping.ignore_eos:
            seq.finish_reason = FinishReason.EOS
        elif seq.num_completion_tokens >= seq.max_new_tokens:
            seq.finish_reason = FinishReason.LENGTH
        event = GenerationEvent(
            seq.id, seq.detokenizer.take_text(final=seq.finish_reason is not None), [token]
        )
        if seq.finish_reason is not None:
            self._complete(seq, event)
        outbox.append((seq, event))

    def _complete(self, seq: Sequence, event: GenerationEvent) -> None:
        now = time.monotonic()
        arrival = seq.request.arrival_time
        event.finish_reason = seq.finish_reason
        event.prompt_tokens = seq.num_prompt_tokens
        event.completion_tokens = seq.num_completion_tokens
        event.timing = Timing(
            queue_s=(seq.admitted_time or now) - arrival,
            time_to_first_token_s=(seq.first_token_time or now) - arrival,
            total_s=now - arrival,
        )
        self._retire(seq, None)

    def _end(self, seq: Sequence, outbox: list, error: Exception) -> None:
        """End a sequence with an error (cancelled, deadline, fault): free its blocks, tell its caller."""
        if seq.status is SequenceStatus.FINISHED:
            return
        self._retire(seq, error)
        outbox.append((seq, error))

    def _retire(self, seq: Sequence, error: Exception | None) -> None:
        self.scheduler.finish(seq)
        with self._lock:
            self._live.pop(seq.id, None)
        self.observer.request_finished(seq, error)

    def _dispatch(self, outbox: list[tuple[Sequence, object]]) -> None:
        """Hand this step's events to their callers: one thread crossing per asyncio loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, item in outbox:
            sink = seq.sink
            if isinstance(sink, _AsyncSink):
                by_loop.setdefault(sink.loop, []).append((sink.queue, item))
            else:
                sink.put((seq.id, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, items)

    def _fail_all(self, error: Exception, outbox: list) -> None:
        for seq in self._live_sequences():
            self._end(seq, outbox, error)

    # ---- helpers ------------------------------------------------------------------------------------------

    def _eos_token_ids(self) -> set[int]:
        ids = set()
        for source in (self.model_runner.model.generation_config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        return ids

    def _warmup_token(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else 0

    def _result(self, request_id: str, events: list[GenerationEvent]) -> GenerationResult:
        last = events[-1]
        tokens = [t for e in events for t in e.tokens]
        return GenerationResult(
            request_id=request_id,
            text="".join(e.text for e in events),
            token_ids=[t.id for t in tokens],
            tokens=tokens,
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            timing=last.timing,
        )


def _validate_sampling(sp: SamplingParams) -> None:
    checks = [
        ("temperature", sp.temperature >= 0, "must be >= 0"),
        ("top_k", sp.top_k >= 0, "must be >= 0 (0 turns it off)"),
        ("top_p", 0 < sp.top_p <= 1, "must be in (0, 1]"),
        ("min_p", 0 <= sp.min_p <= 1, "must be in [0, 1]"),
        ("repetition_penalty", sp.repetition_penalty > 0, "must be > 0"),
        ("frequency_penalty", -2 <= sp.frequency_penalty <= 2, "must be in [-2, 2]"),
        ("presence_penalty", -2 <= sp.presence_penalty <= 2, "must be in [-2, 2]"),
    ]
    for name, ok, message in checks:
        if not ok:
            raise InvalidRequestError(f"sampling.{name}", message)
