"""The engine's front door: submit, cancel and offline generate, served by one step-loop thread.

Callers never touch engine state: `submit` and `cancel` append commands to an `Inbox` that only the
loop thread (`engine.frontend.loop`) applies, the model of TGI's router queue; the counts callers read
(`load`) come from the snapshot that thread publishes after each pass. The loop thread
owns everything else: the `EngineCore` (scheduler, model runner, output processor) and each request's
event sink.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.batching import BatchConfig
from engine.core.engine_core import EngineCore
from engine.core.inbox import Inbox
from engine.core.kv_cache import check_block_size
from engine.core.kv_events import KvEventLog
from engine.core.load import EngineLoad
from engine.core.observer import EngineObserver
from engine.core.output import OutputProcessor
from engine.core.scheduler import SchedulerConfig
from engine.core.scheduling_modes import make_scheduler
from engine.core.sequence import Sequence, SequenceGroup
from engine.core.structured import GRAMMAR_STEP_BUDGET_MS, GrammarCompiler
from engine.errors import EngineStoppedError, InvalidRequestError
from engine.execution.model_runner import ModelRunner
from engine.frontend.limits import MAX_CHAT_MESSAGES, MAX_N, MAX_PROMPT_CHARS, RequestLimits, check_request
from engine.frontend.loop import AsyncSink, EngineLoop
from engine.frontend.results import GenerationResult, coalesced, fold
from engine.request import (
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    StoppingParams,
)


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs to start; `model=None` is the default SmolLM2 model."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch: BatchConfig = field(default_factory=BatchConfig)
    max_queue_size: int = 1024
    num_kv_blocks: int = 0  # 0: sized from free memory (CUDA), or 1 GiB or 64 full contexts (CPU)
    kv_block_size: int = 16
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 4096
    max_prompt_chars: int = MAX_PROMPT_CHARS  # of a prompt or a chat, checked before tokenizing
    max_chat_messages: int = MAX_CHAT_MESSAGES
    max_model_len: int = 0  # 0: the model's own context length
    scheduling: str = "continuous"
    max_decode_stall_ms: float = 200.0
    attention_backend: str = "auto"  # decode attention: auto, torch (gathers blocks), cpu or triton (kernels)
    weight_format: str = "auto"  # "fp16-packed": CPU linear layers on FBGEMM's float16 GEMM; "native"
    prefill_chunk_tokens: int = -1  # most tokens per forward pass of a prefill step; -1: 512 on CPU, 0: all
    model_impl: str = "auto"  # lean code for the Llama family where supported, else transformers' modeling
    prefix_caching: bool = True  # share the KV blocks of prompt prefixes computed before
    max_n: int = MAX_N  # the most completions one request may ask for
    cuda_graphs: bool = True  # on CUDA, decode steps replay a graph per batch-size bucket (lean code, triton)
    grammar_step_budget_ms: float = GRAMMAR_STEP_BUDGET_MS  # CPU time one mask may take, else it fails alone

    def __post_init__(self) -> None:
        check_block_size(self.kv_block_size)


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


class Engine:
    """Continuous-batching generation engine. `submit`/`cancel` are safe to call from any thread or loop."""

    def __init__(self, config: EngineConfig | None = None, observer: EngineObserver | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self._inbox = Inbox(config.max_queue_size)
        self._accepting = True
        self._go = threading.Event()
        self.core = self._start_loop_thread()
        self.model_runner: ModelRunner = self.core.runner
        self.tokenizer = self.model_runner.tokenizer
        self.eos_token_ids: set[int] = self.core.outputs.eos_token_ids
        self.max_context_len = _max_context_len(self.model_runner, config)
        allocator = self.model_runner.allocator
        # The prefix cache's events, for gateways that route by it; the loop thread has not started yet.
        self.kv_events = KvEventLog(allocator.block_size)
        if config.prefix_caching:
            allocator.events = self.kv_events
        self.limits = RequestLimits(
            max_context_len=self.max_context_len,
            vocab_size=self.model_runner.vocab_size,
            kv_capacity_tokens=allocator.num_blocks * allocator.block_size,
            default_max_new_tokens=config.default_max_new_tokens,
            max_new_tokens_limit=config.max_new_tokens_limit,
            max_prompt_chars=config.max_prompt_chars,
            max_chat_messages=config.max_chat_messages,
            max_n=config.max_n,
        )
        self.grammars = GrammarCompiler(self.tokenizer, self.model_runner.vocab_size, self.eos_token_ids)

    # ---- what the engine serves -------------------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        runner = self.model_runner
        return ModelInfo(
            name=runner.name,
            max_context_len=self.max_context_len,
            vocab_size=runner.vocab_size,
            eos_token_ids=sorted(self.eos_token_ids),
            device=str(runner.device),
            dtype=str(runner.dtype).removeprefix("torch."),
            kv_block_size=runner.block_size,
            num_kv_blocks=self.load.num_kv_blocks,
        )

    @property
    def load(self) -> EngineLoad:
        """The loop thread's numbers after its last pass (published whole: one moment's numbers); its
        `num_waiting` counts the sequences submitted and not yet admitted, those the loop has not seen too."""
        return self._inbox.load

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Render chat messages with the model's template, ready for the assistant's reply; `tools` (OpenAI's
        function descriptions) go to a template that renders them."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("chat", "this model has no chat template; send a prompt instead")
        extra = {"tools": tools} if tools else {}
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    # ---- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Warm the model up and start the step loop (idempotent)."""
        if self._go.is_set():
            return
        self._go.set()
        self.generate([[self._warmup_token()]], stopping=StoppingParams(max_new_tokens=2, ignore_eos=True))

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; requests already submitted carry on."""
        self._accepting = False

    def shutdown(self) -> None:
        """Stop the step loop; requests still in flight fail."""
        self._accepting = False
        self._inbox.stop()
        self._go.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    # ---- requests ---------------------------------------------------------------------------------------

    def submit(
        self, request: GenerationRequest, max_new_tokens: int | None = None
    ) -> AsyncIterator[GenerationEvent]:
        """Queue a request; iterate the result for its events. Raises at once if it cannot be queued.

        `max_new_tokens` is given by admission (engine/frontend/admission.py), which has checked the
        request's rules; without it they are checked here.

        Events that queued up while the caller was busy (sending the previous one, say) come merged into
        one per completion (`results.coalesced`): a caller that is behind gets fewer, larger events.
        With `request.n` > 1 the completions' events interleave (each has its `index`); the iteration ends
        once every completion has finished, or with the first error (which cancels the others). Closing the
        iterator before the last event cancels the request.
        """
        sink = AsyncSink(asyncio.get_running_loop())
        first = self._enqueue(request, sink, max_new_tokens)
        return self._events(first, request.n, sink.queue)

    def cancel(self, request_id: str) -> None:
        """Cancel a queued or running request; its blocks are freed at the next step. Idempotent.

        The request id is free for a new request as soon as this returns.
        """
        self._inbox.cancel(request_id)

    def clear_prefix_cache(self) -> Future:
        """Drop the prefix cache's index at the next step, requests in flight untouched (they keep their
        blocks); the future gives the number of blocks it held."""
        return self._inbox.clear_prefix_cache()

    def generate(
        self,
        prompts: list[str | list[int]],
        sampling: SamplingParams | list[SamplingParams] | None = None,
        stopping: StoppingParams | list[StoppingParams] | None = None,
    ) -> list[GenerationResult]:
        """Offline batch generation through the same engine loop (for examples, tests and benchmarks)."""
        self._go.set()
        n = len(prompts)
        samplings = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * n
        stoppings = stopping if isinstance(stopping, list) else [stopping or StoppingParams()] * n
        sink: queue.Queue = queue.Queue()
        requests = []
        for prompt, sp, st in zip(prompts, samplings, stoppings, strict=True):
            ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            requests.append(GenerationRequest(ids, sp, st))
            self._enqueue(requests[-1], sink)
        collected: dict[str, list[GenerationEvent]] = {r.request_id: [] for r in requests}
        remaining = n
        while remaining:
            request_id, item = sink.get()
            if isinstance(item, Exception):
                raise item
            collected[request_id].append(item)
            remaining -= item.finished
        return [fold(collected[r.request_id])[0] for r in requests]

    def _enqueue(
        self, request: GenerationRequest, sink: AsyncSink | queue.Queue, max_new_tokens: int | None = None
    ) -> Sequence:
        """Queue a request's completion 0, whose group's events go to `sink`; the loop forks the others."""
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and accepts no new requests")
        if max_new_tokens is None:
            max_new_tokens = check_request(request, self.limits)
        first = Sequence(request, max_new_tokens, group=SequenceGroup(sink))
        if request.sampling.response_format is not None:  # each fork takes a matcher of its own from it
            first.grammar = self.grammars.matcher(request.sampling.response_format)
        self._inbox.add(first, self.observer.request_queued)
        return first

    async def _events(self, first: Sequence, n: int, events: asyncio.Queue) -> AsyncIterator[GenerationEvent]:
        remaining = n
        try:
            while remaining:
                for item in coalesced(await _ready(events)):
                    if isinstance(item, Exception):
                        remaining -= 1  # that completion has ended; the others, if any, are cancelled below
                        raise item
                    remaining -= item.finished
                    yield item
        finally:
            if remaining:  # the consumer went away, or one completion failed: free the request's KV blocks
                self._inbox.cancel(first.id, first.group_id)

    # ---- the loop thread --------------------------------------------------------------------------------

    def _start_loop_thread(self) -> EngineCore:
        """Start the loop thread, which builds the core (loads the model) and then waits for `_go`.

        All torch work happens on this one thread: with libgomp, a second thread running parallel torch
        ops gets its own OpenMP team, and two teams on a small CPU slow every op down (README, "CPU dtype,
        weights and attention").
        """
        built: list[EngineCore | BaseException] = []
        ready = threading.Event()

        def main() -> None:
            try:
                built.append(_build_core(self.config, self.observer))
                self._inbox.publish(built[0].load())
            except BaseException as exc:  # handed to the constructor's thread, which raises it
                built.append(exc)
                return
            finally:
                ready.set()
            self._go.wait()
            try:
                EngineLoop(built[0], self._inbox, self.kv_events).run()
            finally:
                built[0].runner.close()

        self._thread = threading.Thread(target=main, name="textgen-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if isinstance(built[0], BaseException):
            self._thread.join()
            raise built[0]
        return built[0]

    def _warmup_token(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else 0


async def _ready(events: asyncio.Queue) -> list[GenerationEvent | Exception]:
    """The next item of `events`, and every item queued behind it up to the first failure (which ends the
    request for its caller: nothing after it is read)."""
    items = [await events.get()]
    while not isinstance(items[-1], Exception) and not events.empty():
        items.append(events.get_nowait())
    return items


def _build_core(config: EngineConfig, observer: EngineObserver) -> EngineCore:
    """Load the model and build what the loop thread owns."""
    runner = ModelRunner(
        config.model,
        config.device,
        config.dtype,
        config.num_kv_blocks,
        config.kv_block_size,
        config.attention_backend,
        config.weight_format,
        config.prefill_chunk_tokens,
        config.model_impl,
        config.grammar_step_budget_ms,
    )
    if config.cuda_graphs:
        runner.capture_decode_graphs(config.batch.max_batch_size, _max_context_len(runner, config))
    scheduler = make_scheduler(
        config.scheduling,
        SchedulerConfig(config.batch, config.max_decode_stall_ms, config.prefix_caching),
        runner.allocator,
        max_context_len=_max_context_len(runner, config),
        observer=observer,
    )
    outputs = OutputProcessor(runner.tokenizer, set(runner.tokenizer.all_special_ids), _eos_token_ids(runner))
    return EngineCore(scheduler, runner, outputs, observer)


def _max_context_len(runner: ModelRunner, config: EngineConfig) -> int:
    limit = runner.max_context_len
    return min(limit, config.max_model_len) if config.max_model_len > 0 else limit


def _eos_token_ids(runner: ModelRunner) -> set[int]:
    ids = set()
    for source in (runner.model.generation_config, runner.tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return ids
