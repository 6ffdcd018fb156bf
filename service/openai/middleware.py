"""The HTTP front's middlewares, outermost first: a span per request, OpenAI's error body for every error,
the Host check against DNS rebinding, and API keys."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from service.openai.headers import api_key
from service.openai.response import ErrorResponse, error_response, http_error_response
from service.openai.stream import STREAM_ERROR
from service.security.auth import ApiKeys
from service.security.host_check import refusal
from service.status import Unauthenticated

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

# Probes carry no secrets and health tells nothing, as on gRPC (service/security/auth.py).
OPEN_PATHS = ("/health",)
_MISSING_KEY = "this server needs an API key: send the header 'Authorization: Bearer <key>'"
_INVALID_KEY = "the API key is not valid"


@web.middleware
async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as OpenAI answers it (service/openai/response.py)."""
    try:
        return await handler(request)
    except ConnectionResetError:
        raise  # the client went away, mid-stream perhaps: there is no one to answer
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _error(http_error_response(error.status, error.reason))
    except Exception as error:
        return _error(error_response(error))


def check_host(allowed: frozenset[str] | None) -> Middleware:
    """403 for a Host (or Origin) header outside `allowed` (None: any; service/security/host_check.py)."""

    @web.middleware
    async def checked(request: web.Request, handler: Handler) -> web.StreamResponse:
        if allowed is not None:
            why = refusal(allowed, request.headers.get("Host"), request.headers.get("Origin"))
            if why is not None:
                raise web.HTTPForbidden(reason=why)
        return await handler(request)

    return checked


def authenticate(api_keys: ApiKeys | None) -> Middleware:
    """401 for a call without a key `api_keys` accepts (None: no keys), but on `OPEN_PATHS`."""

    @web.middleware
    async def authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
        if api_keys is not None and request.path not in OPEN_PATHS:
            token = api_key(request)
            if not api_keys.accepts(token):
                raise Unauthenticated(_MISSING_KEY if token is None else _INVALID_KEY)
        return await handler(request)

    return authenticated


def _error(answer: ErrorResponse) -> web.Response:
    return web.json_response(answer.body, status=answer.status, headers=answer.headers)


def tracing(tracer: trace.Tracer) -> Middleware:
    """A server span per request, the child of the caller's W3C trace context (`traceparent` header), with
    HTTP's semantic-convention attributes; headers (the API key among them) are never recorded."""

    @web.middleware
    async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else ""
        attributes = {
            "http.request.method": request.method,
            "http.route": route,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "user_agent.original": request.headers.get("User-Agent", ""),
            "client.address": request.remote or "",
        }
        with tracer.start_as_current_span(
            f"{request.method} {route}".rstrip(),
            propagate.extract(request.headers),
            SpanKind.SERVER,
            attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                response = await handler(request)
            except asyncio.CancelledError:  # the client closed the connection
                span.set_attribute("error.type", "cancelled")
                span.set_status(Status(StatusCode.ERROR, "the client closed the connection"))
                raise
            span.set_attribute("http.response.status_code", response.status)
            status, error_type = request.get(STREAM_ERROR, (response.status, str(response.status)))
            if status >= 500:  # 4xx is the client's doing: not an error of the server (HTTP conventions)
                span.set_attribute("error.type", error_type)
                span.set_status(Status(StatusCode.ERROR, error_type))
            return response

    return traced
