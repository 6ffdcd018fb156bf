"""When to retry a failed call: UNAVAILABLE and RESOURCE_EXHAUSTED, after the server's RetryInfo delay
or an exponential backoff with full jitter, never past the call's deadline."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """At most `max_attempts` tries of a retryable call; backoff doubles from `initial_backoff_s`."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def delay(self, attempt: int, error: grpc.RpcError, deadline: float | None) -> float | None:
        """Seconds to sleep before retrying after failed attempt `attempt` (from 1), or None to give up."""
        if attempt >= self.max_attempts or error.code() not in RETRYABLE:
            return None
        delay = retry_delay(error)
        if delay is None:
            delay = random.uniform(
                0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
            )
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


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


def time_left(deadline: float | None) -> float | None:
    """The timeout for the next attempt of a call that must end by `deadline` (a monotonic instant)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


DEFAULT_RETRY = RetryPolicy()
