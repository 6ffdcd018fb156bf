"""Errors the engine raises to its callers; `service/` maps each to one gRPC status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine reports."""


class InvalidRequestError(EngineError, ValueError):
    """The request can never be served as given (bad parameter, prompt too long)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class QueueFullError(EngineError):
    """The waiting queue is at its limit; retrying after `retry_after_s` may succeed."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(EngineError):
    """The request's deadline passed before it finished."""


class RequestCancelledError(EngineError):
    """The request was cancelled by its caller."""


class EngineStoppedError(EngineError):
    """The engine is draining or stopped and accepts no new requests."""


class RequestFailedError(EngineError):
    """An engine fault hit this request; other requests carry on."""
