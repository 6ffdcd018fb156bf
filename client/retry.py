"""When to retry a failed call: UNAVAILABLE after the server's RetryInfo delay or an exponential backoff
with full jitter, RESOURCE_EXHAUSTED only after the server's RetryInfo delay, never past the call's
deadline."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """At most `max_attempts` tries of a retryable call; backoff doubles from `initial_backoff_s`."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """A full-jitter exponential backoff in seconds after failed attempt `attempt` (from 1)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(0, ceiling)


DEFAULT_RETRY = RetryPolicy()


class Retries:
    """The attempts of one call that must end within `timeout` seconds (None: no deadline).

    Both clients loop: try with `time_left()` as the timeout; on an error, sleep `delay_after(error)`,
    which raises the error instead when the call gives up.
    """

    def __init__(self, policy: RetryPolicy, timeout: float | None) -> None:
        self._policy = policy
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._attempt = 1

    def time_left(self) -> float | None:
        """The timeout for the next attempt: what is left until the call's deadline."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def delay_after(self, error: grpc.RpcError, *, received: bool = False) -> float:
        """Seconds to sleep before retrying after `error`; raises `error` when the call gives up.

        `received`: a stream already got a message, which a retry would repeat, so it gives up.
        """
        delay = None if received else self._delay(error)
        if delay is None or (self._deadline is not None and time.monotonic() + delay >= self._deadline):
            raise error
        self._attempt += 1
        return delay

    def _delay(self, error: grpc.RpcError) -> float | None:
        if self._attempt >= self._policy.max_attempts:
            return None
        code = error.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            delay = retry_delay(error)
            return self._policy.backoff(self._attempt) if delay is None else delay
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # Only a server's RetryInfo says a retry can help: gRPC raises this code itself for failures
            # that repeat, such as a message larger than the channel's limit.
            return retry_delay(error)
        return None


def retry_delay(error: grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay the server attached to `error`, if any."""
    for key, value in error.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return info.retry_delay.ToNanoseconds() / 1e9
    return None
