"""The engine as every front (gRPC, OpenAI HTTP) sees it: readiness, tokenizing off the event loop, and
the generations in flight, which the drain waits for whichever front they came through."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from engine.frontend.admission import Admission, Admitted, admit
from engine.frontend.engine import Engine
from engine.frontend.limits import RequestLimits
from engine.request import GenerationEvent
from service.status import NotReady

T = TypeVar("T")

# Threads that tokenize and render chat templates, so that a long prompt never stalls the event loop (README:
# Flags). Tokenizers only: all torch work stays on the engine's loop thread (README: CPU dtype, ...).
NUM_TOKENIZER_THREADS = 2


class Generations:
    """One engine shared by the fronts, attached once it is loaded; until then `ready()` raises `NotReady`."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._limits: RequestLimits | None = None
        self._draining = False
        self._tokenizer_threads = ThreadPoolExecutor(NUM_TOKENIZER_THREADS, thread_name_prefix="tokenizer")
        self._num_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def attach(self, engine: Engine) -> None:
        """Serve from `engine`, which is loaded and started."""
        self._limits = engine.limits
        self._engine = engine

    def stop_accepting(self) -> None:
        """Drain: new requests are refused from now on (`EngineStoppedError`); those in flight carry on."""
        self._draining = True
        if self._engine is not None:
            self._engine.stop_accepting()

    @property
    def serving(self) -> bool:
        """Whether new requests are taken: the model is loaded and the server is not draining."""
        return self._engine is not None and not self._draining

    @property
    def num_in_flight(self) -> int:
        return self._num_in_flight

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no generation is in flight, at most `timeout_s`; whether that happened."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def ready(self) -> tuple[Engine, RequestLimits]:
        """The engine and its limits; `NotReady` while the model loads."""
        if self._engine is None or self._limits is None:
            raise NotReady("the model is loading; retry shortly")
        return self._engine, self._limits

    async def off_loop(self, function: Callable[..., T], *args: object) -> T:
        """`function(*args)` on a tokenizer thread, so that the event loop serves other calls meanwhile."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_threads, functools.partial(function, *args))

    async def admit(self, admission: Admission) -> Admitted:
        """Admit `admission` through the engine's one admission path (engine/frontend/admission.py), its
        tokenizing and grammar on this service's tokenizer threads; iterating its events counts it in flight.

        The engine's refusals (`InvalidRequestError`, naming the front's fields) are raised here, or for a
        full queue, a draining engine or a duplicate id (`QueueFullError`, ...) at the first `__anext__`.
        Closing the events (which cancels the request if it has not finished) frees its id at once.
        """
        engine, _ = self.ready()
        admitted = await admit(engine, admission, self._tokenizer_threads)
        admitted.events = self._in_flight(admitted.events)
        return admitted

    async def _in_flight(self, events: AsyncIterator[GenerationEvent]) -> AsyncIterator[GenerationEvent]:
        self._num_in_flight += 1
        self._idle.clear()
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event
        finally:
            self._num_in_flight -= 1
            if not self._num_in_flight:
                self._idle.set()
