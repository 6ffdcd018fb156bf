"""The one door between callers' threads and the engine's loop thread: commands in, the load out.

Callers append `Add` and `Cancel` commands; only the loop thread takes them and applies them to the
engine's state. The inbox also knows which request ids are in flight, so that a duplicate is refused at
once and an id is free again the moment its request is cancelled or ends. The other way, the loop thread
publishes an `EngineLoad` snapshot after each pass: callers read loop state only from it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from engine.core.load import EngineLoad
from engine.core.sequence import Sequence
from engine.errors import DuplicateRequestError, QueueFullError, RequestCancelledError


@dataclass(slots=True)
class Add:
    seq: Sequence  # a request's completion 0 (its group's sink says where its events go)


@dataclass(slots=True)
class Cancel:
    group_id: int  # every sequence of the request
    error: Exception


@dataclass(slots=True)
class ClearPrefixCache:
    done: Future = field(default_factory=Future)  # the number of blocks the index held


Command = Add | Cancel | ClearPrefixCache
Announce = Callable[[Sequence], None]


class Inbox:
    """Commands for the loop thread, the request ids in flight and the loop's last load, under one lock."""

    def __init__(self, max_queue_size: int) -> None:
        self.max_queue_size = max_queue_size
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._commands: list[Command] = []
        self._live: dict[str, int] = {}  # request id -> its sequences' group id, until the request ends
        self._stopped = False
        self._published = EngineLoad()  # the loop's last, replaced whole by `publish`
        self._num_taken = 0  # sequences the loop took since its last `publish`, not in `_published` yet

    @property
    def load(self) -> EngineLoad:
        """The loop's last published load, its `num_waiting` with the sequences on their way to the
        scheduler's queue (in the inbox, or taken by the loop since it published)."""
        with self._lock:
            return replace(self._published, num_waiting=self._num_waiting())

    def publish(self, load: EngineLoad) -> None:
        """The loop thread's load after applying the commands it took and running a step."""
        with self._lock:
            self._published = load
            self._num_taken = 0

    def add(self, first: Sequence, announce: Announce) -> None:
        """Queue a request's completion 0 unless its id is in flight or its `n` completions do not fit in
        the queue (`load.num_waiting` and them, in sequences).

        `announce` runs once the request is accepted and before the loop thread can see it.
        """
        with self._wakeup:
            if first.id in self._live:
                raise DuplicateRequestError(f"request_id {first.id!r} is already in flight")
            if self._num_waiting() + first.request.n > self.max_queue_size:
                raise QueueFullError(f"the queue is full ({self.max_queue_size} requests waiting)")
            announce(first)
            self._live[first.id] = first.group_id
            self._commands.append(Add(first))
            self._wakeup.notify()

    def cancel(self, request_id: str, group_id: int | None = None) -> None:
        """Cancel the request `request_id` in flight (only if its group is `group_id`, when given)."""
        with self._wakeup:
            live = self._live.get(request_id)
            if live is None or (group_id is not None and live != group_id):
                return
            del self._live[request_id]
            self._commands.append(Cancel(live, RequestCancelledError(f"request {request_id} was cancelled")))
            self._wakeup.notify()

    def clear_prefix_cache(self) -> Future:
        command = ClearPrefixCache()
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()
        return command.done

    def forget(self, seq: Sequence) -> None:
        """The last sequence of `seq`'s request has ended: its request id is free again."""
        with self._lock:
            if self._live.get(seq.id) == seq.group_id:
                del self._live[seq.id]

    def stop(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()

    def take(self, has_work: Callable[[], bool], timeout: Callable[[], float | None]) -> list[Command] | None:
        """Wait until there are commands or `has_work()`, at most `timeout()` at a time; take the commands.

        None once stopped (`drain` then takes what is left).
        """
        with self._wakeup:
            while not self._stopped and not self._commands and not has_work():
                self._wakeup.wait(timeout=timeout())
            if self._stopped:
                return None
            return self._take()

    def drain(self) -> list[Command]:
        with self._lock:
            return self._take()

    def _take(self) -> list[Command]:
        commands, self._commands = self._commands, []
        self._num_taken += _num_seqs(commands)
        return commands

    def _num_waiting(self) -> int:
        return self._published.num_waiting + self._num_taken + _num_seqs(self._commands)


def _num_seqs(commands: list[Command]) -> int:
    return sum(command.seq.request.n for command in commands if isinstance(command, Add))
