"""The engine's loop thread: it applies callers' commands, steps the core, publishes the load and hands
each step's events to their callers. It alone touches the core (scheduler, runner, output state).

Callers never touch engine state: `Engine.submit` and `cancel` append commands to an `Inbox` that only this
thread applies (the model of TGI's router queue), and read back only the `EngineLoad` it publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from engine.core.engine_core import EngineCore, Outbox
from engine.core.inbox import Add, Cancel, ClearPrefixCache, Command, Inbox
from engine.core.kv_events import KvEventLog
from engine.core.sequence import Sequence
from engine.errors import EngineStoppedError, RequestFailedError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AsyncSink:
    """Delivers a request's events to an asyncio queue on the loop that submitted it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class EngineLoop:
    """The body of the loop thread, from the first command to the last event after `Inbox.stop`."""

    def __init__(self, core: EngineCore, inbox: Inbox, kv_events: KvEventLog) -> None:
        self.core = core
        self.inbox = inbox
        self.kv_events = kv_events

    def run(self) -> None:
        """Serve until the inbox stops; then fail what is still in flight."""
        core, inbox = self.core, self.inbox
        while (commands := inbox.take(core.scheduler.has_work, core.scheduler.idle_timeout)) is not None:
            outbox: Outbox = []
            try:
                self._apply(commands, outbox)
                core.step(outbox)
            except Exception as exc:  # a bug outside the model step: fail what is in flight, keep serving
                log.exception("engine loop failed")
                core.fail_all(RequestFailedError(f"engine fault: {exc}"), outbox)
            inbox.publish(core.load())
            self.kv_events.publish()  # before the events: a request's blocks are published when it ends
            self._dispatch(outbox)
        outbox = []
        self._apply(inbox.drain(), outbox)
        core.fail_all(EngineStoppedError("the engine stopped"), outbox)
        inbox.publish(core.load())
        self._dispatch(outbox)

    def _apply(self, commands: list[Command], outbox: Outbox) -> None:
        for command in commands:
            if isinstance(command, Add):
                self.core.add(command.seq)
            elif isinstance(command, Cancel):
                self.core.abort_group(command.group_id, command.error, outbox)
            elif isinstance(command, ClearPrefixCache):
                command.done.set_result(self.core.scheduler.allocator.clear_cache())

    def _dispatch(self, outbox: Outbox) -> None:
        """Hand this step's events to their callers: one thread crossing per asyncio loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, item in outbox:
            sink = seq.group.sink
            if isinstance(item, Exception) or item.finished:
                self._end(seq)
            if isinstance(sink, AsyncSink):
                by_loop.setdefault(sink.loop, []).append((sink.queue, item))
            else:
                sink.put((seq.id, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, items)

    def _end(self, seq: Sequence) -> None:
        """`seq` has ended; once its whole request has (forks included), the request id is free again."""
        seq.group.num_live -= 1
        if not seq.group.num_live:
            self.inbox.forget(seq)


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)
