"""Errors the engine raises to its callers; `service/` maps each to one gRPC status."""

from __future__ import annotations

from collections.abc import Sequence


class EngineError(Exception):
    """Base class of every error the engine reports."""


class InvalidRequestError(EngineError, ValueError):
    """The request can never be served as given (bad parameter, prompt too long).

    `violations` are (field path, description) pairs, at least one; `field` and `description` are the first's.
    """

    def __init__(self, field: str, description: str, *more: tuple[str, str]) -> None:
        self.violations = [(field, description), *more]
        super().__init__("; ".join(f"{f}: {d}" for f, d in self.violations))

    @classmethod
    def from_violations(cls, violations: Sequence[tuple[str, str]]) -> InvalidRequestError:
        """One error listing every one of `violations` (not empty)."""
        first, *more = violations
        return cls(*first, *more)

    @property
    def field(self) -> str:
        return self.violations[0][0]

    @property
    def description(self) -> str:
        return self.violations[0][1]


class PromptTooLongError(InvalidRequestError):
    """The input is over a size limit: too many characters or chat messages, or too many tokens to fit."""


class GrammarLimitError(InvalidRequestError):
    """The request's grammar went over the grammar engine's limits while generating (its work in one step,
    lexer states, or the per-step time budget): only this request fails; a simpler format may succeed."""


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


class DuplicateRequestError(EngineError):
    """Another request with the same request id is in flight."""
