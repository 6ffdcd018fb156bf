"""What an HTTP request's headers ask: its request id, its deadline and its API key."""

from __future__ import annotations

import time

from aiohttp import web

from service.security.auth import bearer_token
from service.status import InvalidArgument
from service.validation import MAX_REQUEST_ID_LENGTH

REQUEST_ID_HEADER = "X-Request-Id"  # the engine's request id, echoed; made when absent
TIMEOUT_HEADER = "X-Request-Timeout"  # seconds: the request's deadline, as a gRPC call's timeout


def api_key(request: web.Request) -> str | None:
    """The bearer token of the `Authorization` header; None without one."""
    return bearer_token(("authorization", v) for v in request.headers.getall("Authorization", []))


def request_id(request: web.Request) -> str:
    """The request id header's value; "" without one (admission makes one)."""
    value = request.headers.get(REQUEST_ID_HEADER, "")
    if len(value) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument([(REQUEST_ID_HEADER, f"must be at most {MAX_REQUEST_ID_LENGTH} characters")])
    return value


def deadline(request: web.Request) -> float | None:
    """The `time.monotonic()` instant given by the timeout header; None without one."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        timeout_s = float(value)
    except ValueError:
        timeout_s = float("nan")
    if not 0 < timeout_s < float("inf"):
        raise InvalidArgument([(TIMEOUT_HEADER, f"must be a positive number of seconds, got {value!r}")])
    return time.monotonic() + timeout_s
