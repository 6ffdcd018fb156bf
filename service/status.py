"""Errors to gRPC status: one code per error, with google.rpc details a client can act on."""

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
    InvalidRequestError,
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


class InvalidArgument(Exception):
    """The request can never succeed as sent; `violations` are (proto field path, description) pairs."""

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        assert violations
        super().__init__("; ".join(f"{field}: {description}" for field, description in violations))
        self.violations = list(violations)


class NotReady(Exception):
    """The model is still loading."""


_CODES: list[tuple[type[BaseException], int]] = [
    (InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (InvalidRequestError, code_pb2.INVALID_ARGUMENT),
    (QueueFullError, code_pb2.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, code_pb2.DEADLINE_EXCEEDED),
    (RequestCancelledError, code_pb2.CANCELLED),
    (EngineStoppedError, code_pb2.UNAVAILABLE),
    (NotReady, code_pb2.UNAVAILABLE),
    (DuplicateRequestError, code_pb2.ALREADY_EXISTS),
    (RequestFailedError, code_pb2.INTERNAL),
]


def _pack(message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def to_status(error: BaseException) -> status_pb2.Status:
    """The google.rpc.Status for `error`: its code, a message, and BadRequest or RetryInfo details."""
    code = next((c for cls, c in _CODES if isinstance(error, cls)), code_pb2.INTERNAL)
    if code == code_pb2.INTERNAL and not isinstance(error, RequestFailedError):
        log.exception("unexpected error", exc_info=error)
        return status_pb2.Status(code=code, message="internal error")
    if isinstance(error, InvalidArgument | InvalidRequestError):
        return _bad_request(code, _bounded(error.violations))
    message = _clip(str(error) or type(error).__name__, MAX_MESSAGE_BYTES)
    status = status_pb2.Status(code=code, message=message)
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
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[: max_bytes - 3].decode(errors="ignore") + "..."


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    """End the call with the status for `error`."""
    await context.abort_with_status(rpc_status.to_status(to_status(error)))
    raise AssertionError("abort_with_status returned")  # it always raises
