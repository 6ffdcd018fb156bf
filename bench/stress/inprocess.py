"""A textgen server on the caller's own event loop, for scenarios that look inside it or inject faults.

It is the production `service.server.Server` around an engine built here with a `ServerObserver`,
which sees what no client can: preemptions, and where each request stood when it failed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Self

from engine.core.observer import EngineObserver
from engine.core.sequence import Sequence
from engine.frontend.engine import Engine, EngineConfig
from service.config import ServerConfig
from service.server import Server


class ServerObserver(EngineObserver):
    """Counts preemptions, and the phase (queued, prefill, decode) each request was in when it failed;
    tells a client when its request is admitted."""

    def __init__(self) -> None:
        self.num_preemptions = 0
        self.failed_in_phase: Counter[tuple[str, str]] = Counter()  # (error class, phase) -> requests
        self._queued: set[int] = set()  # sequence ids waiting for (re)admission
        self._admission_events: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}

    def admission(self, request_id: str) -> asyncio.Event:
        """An event of the running loop, set when request `request_id` is first admitted to the batch."""
        event = asyncio.Event()
        self._admission_events[request_id] = (asyncio.get_running_loop(), event)
        return event

    def request_queued(self, seq: Sequence) -> None:
        self._queued.add(seq.seq_id)

    def request_admitted(self, seq: Sequence) -> None:
        self._queued.discard(seq.seq_id)
        if (watch := self._admission_events.pop(seq.id, None)) is not None:
            loop, event = watch
            loop.call_soon_threadsafe(event.set)

    def request_preempted(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self._queued.add(seq.seq_id)

    def request_finished(self, seq: Sequence, error: Exception | None) -> None:
        queued = seq.seq_id in self._queued
        self._queued.discard(seq.seq_id)
        self._admission_events.pop(seq.id, None)
        if error is None:
            return
        if queued:
            phase = "queued"
        elif seq.num_computed_tokens < seq.num_prompt_tokens:
            phase = "prefill"
        else:
            phase = "decode"
        self.failed_in_phase[(type(error).__name__, phase)] += 1


@dataclass(slots=True)
class EngineState:
    """What the engine holds at one moment, and the calls the servicer has in flight."""

    waiting: int
    running: int
    free_kv_blocks: int
    num_kv_blocks: int
    in_flight: int

    @property
    def idle(self) -> bool:
        nothing_held = self.waiting == self.running == self.in_flight == 0
        return nothing_held and self.free_kv_blocks == self.num_kv_blocks

    def __str__(self) -> str:
        return (
            f"queue {self.waiting}, batch {self.running}, "
            f"{self.free_kv_blocks}/{self.num_kv_blocks} KV blocks free, {self.in_flight} calls in flight"
        )


class InProcessServer:
    """`async with InProcessServer(model, max_queue_size=8) as server:` serves on 127.0.0.1, then drains.

    Keyword arguments are `EngineConfig` fields (the CPU and float32 unless given).
    """

    def __init__(self, model: str, grace_period_s: float = 5.0, **engine_fields: object) -> None:
        engine = EngineConfig(**{"model": model, "device": "cpu", "dtype": "float32", **engine_fields})
        self.config = ServerConfig(
            engine=engine, host="127.0.0.1", port=0, grace_period_s=grace_period_s, metrics_port=0
        )
        self.observer = ServerObserver()
        self.server = Server(self.config)
        self.engine: Engine | None = None

    async def __aenter__(self) -> Self:
        await self.server.start()
        try:
            self.engine = await asyncio.to_thread(Engine, self.config.engine, self.observer)
            await asyncio.to_thread(self.engine.start)
            await self.server.load(self.engine)
        except BaseException:
            await self.server.drain()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.server.drain()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def state(self) -> EngineState:
        load = self.engine.load
        return EngineState(
            load.num_waiting,
            load.num_running,
            load.num_free_kv_blocks,
            load.num_kv_blocks,
            self.server.generations.num_in_flight,
        )

    async def settle(self, timeout_s: float = 10.0) -> tuple[EngineState, float]:
        """Wait until the engine is idle with every KV block free (or `timeout_s` passes): the last state
        seen, and how long that took."""
        start = time.monotonic()
        while not (state := self.state()).idle and time.monotonic() - start < timeout_s:
            await asyncio.sleep(0.01)
        return state, time.monotonic() - start
