"""The OpenAI-compatible HTTP front: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`, and
vLLM's `/tokenize` and `/detokenize`.

aiohttp serves it in the server's own event loop, beside grpc.aio, on the same engine
(service/generations.py): the same admission, priorities, deadlines, API keys, drain and telemetry. Errors
are classified once for both fronts (service/status.py) and answered with OpenAI's error body
(service/openai/response.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from engine.errors import EngineStoppedError
from engine.frontend.admission import prompt_ids, renamed
from engine.frontend.engine import Engine
from engine.frontend.results import fold
from engine.request import GenerationEvent, GenerationRequest
from service.config import ServerConfig
from service.generations import Generations
from service.openai.json_body import parse_json_body
from service.openai.request import CHAT, COMPLETION, OpenAIRequest, parse_request
from service.openai.response import (
    EchoedPrompt,
    ErrorResponse,
    ResponseHeader,
    StreamState,
    error_response,
    http_error_response,
    response,
)
from service.openai.tokenize import parse_detokenize, parse_tokenize, tokenize_response
from service.security.auth import ApiKeys, bearer_token
from service.security.host_check import allowed_hosts, refusal
from service.security.tenancy import cache_tenant
from service.status import InvalidArgument, ModelNotFound, Unauthenticated
from service.validation import MAX_REQUEST_ID_LENGTH
from service.worker import http as worker_http

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Probes carry no secrets and health tells nothing, as on gRPC (service/security/auth.py).
OPEN_PATHS = ("/health",)
REQUEST_ID_HEADER = "X-Request-Id"  # the engine's request id, echoed; made when absent
TIMEOUT_HEADER = "X-Request-Timeout"  # seconds: the request's deadline, as a gRPC call's timeout
_MISSING_KEY = "this server needs an API key: send the header 'Authorization: Bearer <key>'"
_INVALID_KEY = "the API key is not valid"


class OpenAIFront:
    """The HTTP server of the OpenAI API, listening from `start()` to `stop()`."""

    def __init__(
        self,
        config: ServerConfig,
        generations: Generations,
        api_keys: ApiKeys | None = None,
        tracer_provider: TracerProvider | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        assert config.http_port is not None
        self._config = config
        self._generations = generations
        self._api_keys = api_keys
        self._ssl_context = ssl_context
        self.port = 0
        self._allowed_hosts = allowed_hosts(config)
        middlewares = [self._answer_errors, self._check_host, self._authenticate]
        if tracer_provider is not None:
            middlewares.insert(0, _tracing(tracer_provider.get_tracer("textgen.http")))
        app = web.Application(middlewares=middlewares, client_max_size=config.max_request_bytes)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        worker_http.add_routes(app, generations)  # what gateways read to identify a worker and its load
        # A client that goes away cancels its handler, and so its engine request; no log line per request.
        # keepalive_timeout runs from a connection's opening too: one with no complete request head (silent,
        # slow) or idle between requests is closed after it.
        self._runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=1.0,
            keepalive_timeout=config.idle_timeout_s,
        )

    async def start(self) -> int:
        """Listen on the configured host and `http_port`; returns the bound port."""
        await self._runner.setup()
        host = self._config.host.strip("[]")
        site = web.TCPSite(
            self._runner,
            None if host in ("::", "0.0.0.0") else host,  # None: every interface, IPv4 and IPv6
            self._config.http_port,
            ssl_context=self._ssl_context,
            reuse_port=False,
        )
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        """Close the port and every connection; requests still running are cancelled."""
        await self._runner.cleanup()

    # ---- middlewares ------------------------------------------------------------------------------------

    @web.middleware
    async def _answer_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
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

    @web.middleware
    async def _check_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._allowed_hosts is not None:
            why = refusal(self._allowed_hosts, request.headers.get("Host"), request.headers.get("Origin"))
            if why is not None:
                raise web.HTTPForbidden(reason=why)
        return await handler(request)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._api_keys is not None and request.path not in OPEN_PATHS:
            token = _api_key(request)
            if not self._api_keys.accepts(token):
                raise Unauthenticated(_MISSING_KEY if token is None else _INVALID_KEY)
        return await handler(request)

    # ---- endpoints --------------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        """200 while serving; 503 while the model loads (code `model_loading`) or the server drains."""
        self._generations.ready()
        if not self._generations.serving:
            raise EngineStoppedError("the server is shutting down")
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        engine, _ = self._generations.ready()
        info = engine.model_info
        model = {
            "id": info.name,
            "object": "model",
            "created": 0,
            "owned_by": "textgen",
            "root": info.name,  # vLLM's field for the model's path, which gateways read
            "max_model_len": info.max_context_len,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETION)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT)

    async def _generate(self, http_request: web.Request, endpoint: str) -> web.StreamResponse:
        engine, limits = self._generations.ready()
        body = await _json_body(http_request, self._config.idle_timeout_s)
        request = parse_request(endpoint, body, limits)
        request.reasoning = self._config.reasoning_parser == "think"
        generation = GenerationRequest(
            prompt_ids=[],
            request_id=_request_id(http_request),
            deadline=_deadline(http_request),
            trace_context=otel_context.get_current(),  # holds the HTTP span: the engine's spans go under it
            cache_tenant=cache_tenant(self._config, _api_key(http_request)),
        )
        admitted = await self._generations.admit(request.admission(generation))
        name = _served_model(engine, request.model)  # nothing is submitted until its events are read
        prompt_ids, request_id = admitted.request.prompt_ids, admitted.request.request_id
        echo = None
        if request.echo:
            echo = await self._generations.off_loop(_echoed_prompt, engine, request.prompt, prompt_ids)
        prefix = "cmpl-" if endpoint == COMPLETION else "chatcmpl-"
        header = ResponseHeader(prefix + request_id, name, endpoint)
        headers = {REQUEST_ID_HEADER: request_id}
        async with contextlib.aclosing(admitted.events) as events:
            first = await anext(events)  # refusals and queue-time failures: still a status of their own
            if request.stream:
                state = StreamState(request, len(prompt_ids), echo)
                return await _stream(http_request, headers, header, state, first, events)
            collected = [first] + [event async for event in events]  # a grammar may fail on the way
        body = await self._generations.off_loop(_json_answer, header, request, collected, echo)  # no stall
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def _tokenize(self, http_request: web.Request) -> web.Response:
        """vLLM's `/tokenize`: the token ids a prompt or a chat runs as (service/openai/tokenize.py)."""
        engine, limits = self._generations.ready()
        body = await _json_body(http_request, self._config.idle_timeout_s)
        request = parse_tokenize(body, limits)
        _served_model(engine, request.input.model)
        with renamed(request.input.param):
            ids = await self._generations.off_loop(prompt_ids, engine, request.prompt())
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return web.json_response(tokenize_response(ids, limits.max_context_len, strs))

    async def _detokenize(self, http_request: web.Request) -> web.Response:
        """vLLM's `/detokenize`: the text of token ids, special tokens included."""
        engine, limits = self._generations.ready()
        body = await _json_body(http_request, self._config.idle_timeout_s)
        request = parse_detokenize(body, limits)
        _served_model(engine, request.model)
        text = await self._generations.off_loop(engine.decode, request.tokens, False)
        return web.json_response({"prompt": text})


def _served_model(engine: Engine, model: str | None) -> str:
    """The served model's name; raises `ModelNotFound` when the body named another."""
    name = engine.model_info.name
    if model not in (None, name):
        raise ModelNotFound(f"the model {model!r} does not exist: this server serves {name!r}")
    return name


def _echoed_prompt(engine: Engine, prompt: str | None, prompt_ids: list[int]) -> EchoedPrompt:
    """What `echo` puts before each completion: the prompt as sent, or its token ids decoded."""
    text = engine.decode(prompt_ids, skip_special_tokens=False) if prompt is None else prompt
    return EchoedPrompt(text, engine.decode(prompt_ids[:1], skip_special_tokens=False))


async def _stream(
    http_request: web.Request,
    headers: dict[str, str],
    header: ResponseHeader,
    state: StreamState,
    first: GenerationEvent,
    events: AsyncIterator[GenerationEvent],
) -> web.StreamResponse:
    """Server-sent events, one `data:` line of JSON per chunk, then `data: [DONE]`.

    A failure after the status line has gone out (a deadline, an engine fault) is sent as one more event
    holding OpenAI's error body, which the `openai` client raises.
    """
    response = web.StreamResponse(
        headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(http_request)
    try:
        for chunk in state.chunks(header, first):
            await response.write(_event(chunk))
        async for event in events:  # every completion's, interleaved; the iterator ends after the last
            for chunk in state.chunks(header, event):
                await response.write(_event(chunk))
        if state.request.include_usage:
            await response.write(_event(state.usage_chunk(header)))
    except ConnectionResetError:
        raise  # the client went away: nothing more to send
    except Exception as error:  # a grammar over its limits names the body's parameter (admission renamed it)
        answer = error_response(error)
        http_request[_STREAM_ERROR] = answer.status, answer.body["error"]["code"]
        await response.write(_event(answer.body))
    await response.write(b"data: [DONE]\n\n")
    return response


def _json_answer(
    header: ResponseHeader, request: OpenAIRequest, events: list[GenerationEvent], echo: EchoedPrompt | None
) -> bytes:
    return json.dumps(response(header, request, fold(events), echo)).encode()


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _error(answer: ErrorResponse) -> web.Response:
    return web.json_response(answer.body, status=answer.status, headers=answer.headers)


async def _json_body(request: web.Request, timeout_s: float) -> object:
    """The body as strict JSON (service/openai/json_body.py); 408 when it takes over `timeout_s` to arrive (a
    connection held by a trickle)."""
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(reason="the request body took too long to arrive") from None
    return parse_json_body(raw)


def _api_key(request: web.Request) -> str | None:
    return bearer_token(("authorization", v) for v in request.headers.getall("Authorization", []))


def _request_id(request: web.Request) -> str:
    request_id = request.headers.get(REQUEST_ID_HEADER, "")
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument([(REQUEST_ID_HEADER, f"must be at most {MAX_REQUEST_ID_LENGTH} characters")])
    return request_id or uuid.uuid4().hex


def _deadline(request: web.Request) -> float | None:
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


# ---- tracing --------------------------------------------------------------------------------------------

# (status, code) of an error sent inside a stream, for its span
_STREAM_ERROR = web.RequestKey("textgen.stream_error", tuple)


def _tracing(tracer: trace.Tracer):
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
            status, error_type = request.get(_STREAM_ERROR, (response.status, str(response.status)))
            if status >= 500:  # 4xx is the client's doing: not an error of the server (HTTP conventions)
                span.set_attribute("error.type", error_type)
                span.set_status(Status(StatusCode.ERROR, error_type))
            return response

    return traced
