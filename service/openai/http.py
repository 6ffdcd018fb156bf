"""The OpenAI-compatible HTTP front: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`, and
vLLM's `/tokenize` and `/detokenize`.

aiohttp serves it in the server's own event loop, beside grpc.aio, on the same engine
(service/generations.py): the same admission, priorities, deadlines, API keys, drain and telemetry. Errors
are classified once for both fronts (service/status.py) and answered with OpenAI's error body
(service/openai/response.py).
"""

from __future__ import annotations

import contextlib
import ssl

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry.trace import TracerProvider

from engine.errors import EngineStoppedError
from engine.frontend.admission import prompt_ids, renamed
from engine.request import GenerationRequest
from service.config import ServerConfig
from service.generations import Generations
from service.openai import headers as http_headers
from service.openai.json_body import read_json_body
from service.openai.middleware import answer_errors, authenticate, check_host, tracing
from service.openai.request import CHAT, COMPLETION, parse_request, served_model
from service.openai.response import EchoedPrompt, ResponseHeader, StreamState, json_answer, models_response
from service.openai.stream import stream_answer
from service.openai.tokenize import parse_detokenize, parse_tokenize, tokenize_response
from service.security.auth import ApiKeys
from service.security.host_check import allowed_hosts
from service.security.tenancy import cache_tenant
from service.worker import http as worker_http


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
        self._ssl_context = ssl_context
        self.port = 0
        middlewares = [answer_errors, check_host(allowed_hosts(config)), authenticate(api_keys)]
        if tracer_provider is not None:
            middlewares.insert(0, tracing(tracer_provider.get_tracer("textgen.http")))
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

    # ---- endpoints --------------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        """200 while serving; 503 while the model loads (code `model_loading`) or the server drains."""
        self._generations.ready()
        if not self._generations.serving:
            raise EngineStoppedError("the server is shutting down")
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        engine, _ = self._generations.ready()
        return web.json_response(models_response(engine.model_info))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETION)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT)

    async def _generate(self, http_request: web.Request, endpoint: str) -> web.StreamResponse:
        engine, limits = self._generations.ready()
        body = await read_json_body(http_request, self._config.idle_timeout_s)
        request = parse_request(endpoint, body, limits)
        request.reasoning = self._config.reasoning_parser == "think"
        generation = GenerationRequest(
            prompt_ids=[],
            request_id=http_headers.request_id(http_request),
            deadline=http_headers.deadline(http_request),
            trace_context=otel_context.get_current(),  # holds the HTTP span: the engine's spans go under it
            cache_tenant=cache_tenant(self._config, http_headers.api_key(http_request)),
        )
        admitted = await self._generations.admit(request.admission(generation))
        name = served_model(engine, request.model)  # nothing is submitted until its events are read
        prompt_ids, request_id = admitted.request.prompt_ids, admitted.request.request_id
        echo = None
        if request.echo:
            echo = await self._generations.off_loop(EchoedPrompt.of, engine, request.prompt, prompt_ids)
        prefix = "cmpl-" if endpoint == COMPLETION else "chatcmpl-"
        header = ResponseHeader(prefix + request_id, name, endpoint)
        headers = {http_headers.REQUEST_ID_HEADER: request_id}
        async with contextlib.aclosing(admitted.events) as events:
            first = await anext(events)  # refusals and queue-time failures: still a status of their own
            if request.stream:
                state = StreamState(request, len(prompt_ids), echo)
                return await stream_answer(http_request, headers, header, state, first, events)
            collected = [first] + [event async for event in events]  # a grammar may fail on the way
        body = await self._generations.off_loop(json_answer, header, request, collected, echo)  # no stall
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def _tokenize(self, http_request: web.Request) -> web.Response:
        """vLLM's `/tokenize`: the token ids a prompt or a chat runs as (service/openai/tokenize.py)."""
        engine, limits = self._generations.ready()
        body = await read_json_body(http_request, self._config.idle_timeout_s)
        request = parse_tokenize(body, limits)
        served_model(engine, request.input.model)
        with renamed(request.input.param):
            ids = await self._generations.off_loop(prompt_ids, engine, request.prompt())
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return web.json_response(tokenize_response(ids, limits.max_context_len, strs))

    async def _detokenize(self, http_request: web.Request) -> web.Response:
        """vLLM's `/detokenize`: the text of token ids, special tokens included."""
        engine, limits = self._generations.ready()
        body = await read_json_body(http_request, self._config.idle_timeout_s)
        request = parse_detokenize(body, limits)
        served_model(engine, request.model)
        text = await self._generations.off_loop(engine.decode, request.tokens, False)
        return web.json_response({"prompt": text})
