"""The grpc.aio server: textgen.v1, SMG's worker protocol, health and reflection around one engine, and the
SIGTERM drain."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from engine.frontend.engine import Engine
from protos.textgen.v1 import textgen_pb2 as pb
from service.config import ServerConfig, grpc_server_options, parse_config
from service.generations import Generations
from service.grpc.servicer import TextGenerationServicer
from service.handlers import add_servicer_to_server
from service.health import BoundedHealthServicer, add_health_to_server
from service.openai.http import OpenAIFront
from service.security.auth import ApiKeyInterceptor, ApiKeys
from service.security.file_watch import reload_on_change
from service.security.host_check import is_loopback
from service.security.tls import ServerCertificates
from service.worker.servicer import SERVICE as WORKER_SERVICE
from service.worker.servicer import VllmWorkerServicer
from telemetry.server import Telemetry

log = logging.getLogger("service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextGenerationService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# After the engine stops, how long the calls it failed get to send their status before the server stops.
FAILED_CALLS_END_S = 2.0


class Server:
    """One gRPC server around one engine, which it owns: health, reflection, load, drain, reload; with
    `http_port` set, the OpenAI-compatible HTTP front too, on the same engine.

    Health is NOT_SERVING from `start()` until `load()` has loaded and warmed the model, SERVING
    after, and NOT_SERVING again from the moment `drain()` begins (HTTP: /health 503, 200, 503).
    """

    def __init__(self, config: ServerConfig, telemetry: Telemetry | None = None) -> None:
        self.config = config
        self.telemetry = telemetry or Telemetry()  # tracing and metrics; default: off
        self.generations = Generations()  # the engine as both fronts see it
        self.servicer = TextGenerationServicer(config, self.generations)
        self.worker = VllmWorkerServicer(self.generations)  # SMG's vLLM worker protocol
        self.health = BoundedHealthServicer(config.max_health_watchers)
        self.engine: Engine | None = None
        self.port = 0
        self.api_keys = ApiKeys(config.api_keys, config.api_key_file) if config.keyed else None
        self.certificates = ServerCertificates(config.tls) if config.tls is not None else None
        self.http: OpenAIFront | None = None
        if config.http_port is not None:
            ssl_context = self.certificates.ssl_context if self.certificates is not None else None
            tracer_provider = self.telemetry.tracer_provider
            self.http = OpenAIFront(config, self.generations, self.api_keys, tracer_provider, ssl_context)
        self._file_watch: asyncio.Task | None = None
        interceptors = self.telemetry.server_interceptors()
        if self.api_keys is not None:
            interceptors.append(ApiKeyInterceptor(self.api_keys))  # after tracing: refused calls get spans
        # No SO_REUSEPORT: a second server on a busy port must fail, not silently share its traffic.
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.so_reuseport", 0), *grpc_server_options(config)],
        )

    async def start(self) -> int:
        """Listen on the configured address; returns the bound port."""
        await self._set_health(NOT_SERVING)
        add_servicer_to_server(self.servicer, self._server)
        add_servicer_to_server(self.worker, self._server, WORKER_SERVICE)
        add_health_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, WORKER_SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self._server,
        )
        if self.certificates is None:
            self.port = self._server.add_insecure_port(self.config.address)
        else:
            self.port = self._server.add_secure_port(self.config.address, self.certificates.credentials)
        await self._server.start()
        log.info("listening on %s:%d", self.config.host, self.port)
        if self.config.reload_check_s and self.watched_files:
            watch = reload_on_change(self.watched_files, self.reload, self.config.reload_check_s)
            self._file_watch = asyncio.create_task(watch, name="reload-on-change")
        if self.http is not None:
            http_port = await self.http.start()
            log.info("OpenAI-compatible HTTP API on %s:%d", self.config.host, http_port)
        for warning in exposure_warnings(self.config):
            log.warning("serving on %s:%d %s", self.config.host, self.port, warning)
        return self.port

    async def load(self, engine: Engine | None = None) -> None:
        """Serve `engine` (already started), or load, start and warm the configured one; then SERVING."""
        if engine is None:
            log.info("loading model %s", self.config.engine.model or "(default SmolLM2)")
            engine = await asyncio.to_thread(Engine, self.config.engine, self.telemetry.observer)
            self.engine = engine  # owned from here: drain() shuts it down even if start() fails
            await asyncio.to_thread(engine.start)
        self.engine = engine
        self.generations.attach(engine)
        self.telemetry.attach(engine)
        await self._set_health(SERVING)
        info = engine.model_info
        log.info(
            "serving %s (%s, %s, %d KV blocks of %d tokens) on %s:%d",
            info.name,
            info.device,
            info.dtype,
            info.num_kv_blocks,
            info.kv_block_size,
            self.config.host,
            self.port,
        )

    async def drain(self) -> None:
        """`retire()`, then stop the gRPC server, in-process: gRPC answers calls that arrive while it stops
        CANCELLED, which is why `python -m service` exits instead (`_exit`)."""
        await self.retire()
        if self._file_watch is not None:
            self._file_watch.cancel()
        await self._server.stop(grace=None)
        if self.http is not None:
            await self.http.stop()
        log.info("stopped")

    async def retire(self) -> None:
        """Stop taking requests, give in-flight ones the grace period to finish, then stop the engine.

        The gRPC server keeps answering meanwhile and after: health NOT_SERVING, every new call UNAVAILABLE
        (DRAINING). `serve()` then ends the process with the server still up (`_exit` says why).
        """
        await self.health.enter_graceful_shutdown()
        self.generations.stop_accepting()
        grace = self.config.grace_period_s
        log.info("draining: %d requests in flight, %g s grace", self.generations.num_in_flight, grace)
        if not await self.generations.wait_idle(grace):
            log.warning("grace period over: %d requests in flight fail", self.generations.num_in_flight)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)  # fails what is left: UNAVAILABLE (DRAINING)
        await self.generations.wait_idle(FAILED_CALLS_END_S)

    def reload(self) -> None:
        """Re-read the API key file and the TLS files (SIGHUP); one that fails to load changes nothing."""
        for what, part in (("API keys", self.api_keys), ("TLS certificates", self.certificates)):
            if part is None:
                continue
            try:
                part.reload()
            except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
                log.error("reloading %s failed, keeping the current ones: %s", what, error)
            else:
                log.info("reloaded %s", what)

    @property
    def watched_files(self) -> list[str]:
        """The files `reload()` re-reads: the API key file and the TLS files, those configured."""
        tls = self.config.tls
        files = [tls.cert_file, tls.key_file, tls.client_ca_file] if tls is not None else []
        return [path for path in (self.config.api_key_file, *files) if path is not None]

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


def exposure_warnings(config: ServerConfig) -> list[str]:
    """What is unsafe in serving `config` beyond this machine; nothing on a loopback address."""
    if is_loopback(config.host):
        return []
    warnings = []
    if config.tls is None:
        warnings.append(
            "without TLS: prompts, outputs and API keys cross the network in clear text "
            "(--tls-cert-file, --tls-key-file)"
        )
    if not (config.api_keys or config.api_key_file or (config.tls and config.tls.client_ca_file)):
        warnings.append(
            "without API keys or client certificates: anyone who reaches the port can use the model "
            "(--api-key-file, TEXTGEN_API_KEYS, --tls-client-ca-file)"
        )
    return warnings


async def serve(config: ServerConfig) -> None:
    """Run a server until SIGTERM or SIGINT, then drain it and exit the process."""
    telemetry = Telemetry.from_env(  # OTEL_* variables
        config.metrics_port, config.host.strip("[]"), config.idle_timeout_s, config.max_connections
    )
    server = Server(config, telemetry)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    try:
        await server.load()
        await stop.wait()  # a signal during loading acts once the engine is up, so it shuts down cleanly
    except BaseException:
        await server.drain()  # the model failed to load: nothing was served, an orderly stop
        await asyncio.to_thread(telemetry.shutdown)
        raise
    await server.retire()
    await asyncio.to_thread(telemetry.shutdown)  # exports the last spans and metrics
    log.info("stopped")
    _exit()


def _exit() -> NoReturn:
    """End the process at once, 0, its gRPC server still answering UNAVAILABLE.

    The kernel closes the connections, so a call that arrives in the last instant fails UNAVAILABLE, which
    clients retry on another replica. Either orderly way ends such a call CANCELLED, which no retry policy
    retries: gRPC's stop refuses calls that reach it before its GOAWAY reaches their client that way, and
    `asyncio.run`'s clean-up cancels the handlers still running (tests/test_service_drain.py).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m service`: parse flags, serve, exit 0 after a clean drain (1 if the model fails to load)."""
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except Exception:
        log.exception("server failed")
        sys.exit(1)
