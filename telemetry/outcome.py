"""How a request ended, as one low-cardinality word shared by spans (`error.type`) and metrics (`outcome`)."""

from __future__ import annotations

from engine.core.sequence import Sequence
from engine.errors import DeadlineExceededError, EngineStoppedError, RequestCancelledError, RequestFailedError

OK = "ok"
CANCELLED = "cancelled"
DEADLINE_EXCEEDED = "deadline_exceeded"

_BY_ERROR = {
    RequestCancelledError: CANCELLED,
    DeadlineExceededError: DEADLINE_EXCEEDED,
    RequestFailedError: "engine_fault",
    EngineStoppedError: "engine_stopped",
}


def outcome(seq: Sequence, error: Exception | None) -> str:
    """`ok`, `cancelled`, `deadline_exceeded`, `engine_fault` or `engine_stopped` (else `error`)."""
    if error is None:
        return OK
    if isinstance(error, RequestCancelledError) and seq.expired():
        return (
            DEADLINE_EXCEEDED  # gRPC cancels a call at its deadline, sometimes before the engine sees it pass
        )
    return _BY_ERROR.get(type(error), "error")
