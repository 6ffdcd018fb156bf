"""Errors to gRPC status: one code and one ErrorInfo reason per error, with details a client can act on."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from engine.errors import (
    DeadlineExceededError,
    DuplicateRequestError,
    EngineStoppedError,
    GrammarLimitError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestCancelledError,
    RequestFailedError,
)

log = logging.getLogger(__name__)

# A status travels in the trailers, its message twice (grpc-message and the details), and clients refuse
# trailers over 16 KiB by default: these bounds keep a status under 8 KiB (1,000 bad fields made ~50 KB).
MAX_FIELD_VIOLATIONS = 10
MAX_FIELD_BYTES = 100
MAX_DESCRIPTION_BYTES = 200
MAX_MESSAGE_BYTES = 512

ERROR_DOMAIN = "textgen.v1"  # google.rpc.ErrorInfo.domain of every status the server sends
# gRPC's own retry policy waits this long before its next attempt (the status's RetryInfo, in milliseconds).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class InvalidArgument(Exception):
    """The request can never succeed as sent; `violations` are (proto field path, description) pairs."""

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        assert violations
        super().__init__("; ".join(f"{field}: {description}" for field, description in violations))
        self.violations = list(violations)


class PromptTooLong(InvalidArgument):
    """The input is over a size limit (characters, chat messages, tokens); shorter, it may succeed."""


class GrammarTooComplex(InvalidArgument):
    """The request's grammar went over the grammar engine's limits while generating (a simpler one may do)."""


def invalid_argument_class(error: InvalidRequestError) -> type[InvalidArgument]:
    """The service's class for an engine refusal: the same violations, renamed by each front, keep their
    ErrorInfo reason."""
    if isinstance(error, PromptTooLongError):
        return PromptTooLong
    if isinstance(error, GrammarLimitError):
        return GrammarTooComplex
    return InvalidArgument


class MalformedRequest(Exception):
    """The request's bytes are not a valid message of the method's request type."""


class NotReady(Exception):
    """The model is still loading."""


class Unauthenticated(Exception):
    """The call carries no API key, or one the server does not accept (service/security/auth.py)."""


class Unimplemented(Exception):
    """The call needs what this server does not do (images, KV transfer, profiling: service/worker/)."""


class ModelNotFound(Exception):
    """The request names a model this server does not serve (the OpenAI HTTP front's `model`)."""


# Each error's status code and google.rpc.ErrorInfo reason (README: Status codes); the first match wins.
_STATUSES: list[tuple[type[BaseException], int, str]] = [
    (PromptTooLong, code_pb2.INVALID_ARGUMENT, "PROMPT_TOO_LONG"),
    (PromptTooLongError, code_pb2.INVALID_ARGUMENT, "PROMPT_TOO_LONG"),
    (GrammarTooComplex, code_pb2.INVALID_ARGUMENT, "GRAMMAR_TOO_COMPLEX"),
    (GrammarLimitError, code_pb2.INVALID_ARGUMENT, "GRAMMAR_TOO_COMPLEX"),
    (InvalidArgument, code_pb2.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (InvalidRequestError, code_pb2.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (MalformedRequest, code_pb2.INVALID_ARGUMENT, "MALFORMED_REQUEST"),
    (QueueFullError, code_pb2.RESOURCE_EXHAUSTED, "QUEUE_FULL"),
    (DeadlineExceededError, code_pb2.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    (RequestCancelledError, code_pb2.CANCELLED, "CANCELLED"),
    (EngineStoppedError, code_pb2.UNAVAILABLE, "DRAINING"),
    (NotReady, code_pb2.UNAVAILABLE, "MODEL_LOADING"),
    (DuplicateRequestError, code_pb2.ALREADY_EXISTS, "ALREADY_EXISTS"),
    (Unauthenticated, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (ModelNotFound, code_pb2.NOT_FOUND, "MODEL_NOT_FOUND"),
    (Unimplemented, code_pb2.UNIMPLEMENTED, "UNIMPLEMENTED"),
    (RequestFailedError, code_pb2.INTERNAL, "ENGINE_FAULT"),
]
_UNEXPECTED = (code_pb2.INTERNAL, "INTERNAL")


def _pack(message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def classify(error: BaseException) -> tuple[int, str]:
    """`error`'s google.rpc code and ErrorInfo reason."""
    return next(((c, r) for cls, c, r in _STATUSES if isinstance(error, cls)), _UNEXPECTED)


def to_status(error: BaseException) -> status_pb2.Status:
    """The google.rpc.Status for `error`: its code, a message, an ErrorInfo, and BadRequest or RetryInfo."""
    code, reason = classify(error)
    error_info = _pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    if (code, reason) == _UNEXPECTED:
        log.exception("unexpected error", exc_info=error)
        return status_pb2.Status(code=code, message="internal error", details=[error_info])
    if isinstance(error, InvalidArgument | InvalidRequestError):
        status = _bad_request(code, _bounded(error.violations))
        status.details.insert(0, error_info)
        return status
    message = _clip(str(error) or type(error).__name__, MAX_MESSAGE_BYTES)
    status = status_pb2.Status(code=code, message=message, details=[error_info])
    if isinstance(error, QueueFullError):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status


def _bounded(violations: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The first `MAX_FIELD_VIOLATIONS` violations, clipped, then one without a field counting the rest."""
    shown = [
        (_clip(field, MAX_FIELD_BYTES), _clip(description, MAX_DESCRIPTION_BYTES))
        for field, description in violations[:MAX_FIELD_VIOLATIONS]
    ]
    left_out = len(violations) - len(shown)
    if left_out:
        shown.append(("", f"and {left_out} more invalid fields, not listed"))
    return shown


def _bad_request(code: int, violations: list[tuple[str, str]]) -> status_pb2.Status:
    """A status whose message and BadRequest details both list `violations`."""
    message = "; ".join(f"{field}: {text}" if field else text for field, text in violations)
    status = status_pb2.Status(code=code, message=_clip(message, MAX_MESSAGE_BYTES))
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in violations
        ]
    )
    status.details.append(_pack(bad_request))
    return status


def _clip(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` bytes of UTF-8, marked with "..." where it was cut."""
    data = text.encode("utf-8", "backslashreplace")  # a lone surrogate (from JSON) is shown, never raises
    if len(data) <= max_bytes:
        return data.decode()
    return data[: max_bytes - 3].decode(errors="ignore") + "..."


def retry_pushback_ms(status: status_pb2.Status) -> int | None:
    """The delay of `status`'s RetryInfo in milliseconds; None without one."""
    retry_info = error_details_pb2.RetryInfo()
    for detail in status.details:
        if detail.Unpack(retry_info):
            return retry_info.retry_delay.ToMilliseconds()
    return None


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    """End the call with the status for `error`; with a RetryInfo, also gRPC's retry pushback trailer."""
    status = to_status(error)
    grpc_status = rpc_status.to_status(status)
    pushback_ms = retry_pushback_ms(status)
    if pushback_ms is not None:
        trailers = (*grpc_status.trailing_metadata, (RETRY_PUSHBACK_KEY, str(pushback_ms)))
        grpc_status = grpc_status._replace(trailing_metadata=trailers)
    await context.abort_with_status(grpc_status)
    raise AssertionError("abort_with_status returned")  # it always raises
