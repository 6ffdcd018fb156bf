"""Server configuration from command-line flags, each defaulting to a `TEXTGEN_*` environment variable."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.batching import BatchConfig
from engine.frontend.engine import EngineConfig
from service.flags import parse_flags
from service.security.auth import parse_key_list
from service.security.tls import TlsFiles

# Client keepalive pings accepted, even with no call in flight: one per 10 s at most, so a client can keep an
# idle connection open through load balancers that drop connections idle for a minute or more.
MIN_CLIENT_PING_INTERVAL_S = 10
# The server's own pings on a quiet connection (every 60 s, unanswered after 20 s: closed) keep a long call's
# connection alive through load balancers and end the calls of clients that vanished.
SERVER_PING_INTERVAL_S = 60
SERVER_PING_TIMEOUT_S = 20


@dataclass(slots=True)
class ServerConfig:
    """What `python -m service` runs: the engine's configuration plus the server's own settings."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "[::]"
    port: int = 50051
    grace_period_s: float = 30.0
    log_level: str = "INFO"
    metrics_port: int = 9464  # Prometheus /metrics; 0: none (README: Observability)
    http_port: int | None = None  # the OpenAI-compatible HTTP front; None: off, 0: a free port
    reasoning_parser: str = "none"  # "think": `<think>` blocks apart (service/chat/reasoning.py)
    max_request_bytes: int = 4 * 1024 * 1024  # the largest request message gRPC receives
    max_metadata_bytes: int = 8 * 1024  # a call's headers
    max_connection_age_s: float = 300.0  # then GOAWAY: clients reconnect, spread over replicas; 0: never
    max_connection_age_grace_s: float = 900.0  # calls in flight on an aged connection get this long to end
    idle_timeout_s: float = 30.0  # connections without a request (HTTP, metrics) or a call (gRPC) are closed
    max_concurrent_streams: int = 100  # gRPC calls in flight on one connection
    max_connections: int = 1000  # gRPC and metrics connections held at once, each port
    # Open grpc.health.v1.Health/Watch streams: a client channel with gRPC's client-side health checking
    # (client.replica_options()) holds one per replica, and counts a refused one as an unhealthy replica.
    max_health_watchers: int = 1000
    tls: TlsFiles | None = None  # PEM files; None: plaintext (README: Security)
    api_key_file: str | None = None  # one key per line, re-read on SIGHUP
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # from TEXTGEN_API_KEYS; never logged
    allowed_hosts: tuple[str, ...] | None = None  # HTTP Host/Origin; None: service/security/host_check.py
    reload_check_s: float = 10.0  # how often the key and TLS files are checked for changes; 0: SIGHUP only
    shared_prefix_cache: bool = False  # with keys: every key reads one prefix cache (default: one per key)

    @property
    def keyed(self) -> bool:
        """Whether calls need an API key (an empty key file name is refused when the server starts)."""
        return bool(self.api_keys) or self.api_key_file is not None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_config(argv: Sequence[str] | None = None) -> ServerConfig:
    """Parse flags (and `TEXTGEN_*` variables) into a `ServerConfig`; exits with usage on bad values."""
    parser, args = parse_flags(argv)
    if args.default_max_new_tokens > args.max_new_tokens_limit:
        parser.error("--default-max-new-tokens must not exceed --max-new-tokens-limit")
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        parser.error("--tls-cert-file and --tls-key-file go together")
    if args.tls_client_ca_file and not args.tls_cert_file:
        parser.error("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
    api_keys = _api_keys(parser, args)
    try:
        engine = _engine_config(args)
    except ValueError as e:
        parser.error(str(e))
    tls = TlsFiles(args.tls_cert_file, args.tls_key_file, args.tls_client_ca_file or None)
    return ServerConfig(
        **_flag_values(args, ServerConfig),  # the flags named as its fields; the rest are read here
        engine=engine,
        tls=tls if args.tls_cert_file else None,
        api_keys=api_keys,
        allowed_hosts=_host_list(args.allowed_hosts),
    )


# ServerConfig and EngineConfig fields whose values are more than their flag's (`parse_config` reads them).
_READ_APART = frozenset({"model", "engine", "batch", "tls", "api_keys", "allowed_hosts"})


def _host_list(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(name.strip().strip("[]").lower() for name in value.split(",") if name.strip())


def _api_keys(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, ...]:
    """The keys of `TEXTGEN_API_KEYS`; exits when it, or `--api-key-file`, is set but names no key.

    Fail closed: an empty setting (`TEXTGEN_API_KEYS=","`, a variable a deployment left empty) meant keys,
    and serving everyone instead would go unnoticed."""
    setting = os.environ.get("TEXTGEN_API_KEYS")
    keys = tuple(parse_key_list(setting or ""))
    if setting is not None and not keys:
        parser.error("TEXTGEN_API_KEYS is set but names no key: give keys, or unset it to serve without keys")
    if args.api_key_file is not None and not args.api_key_file.strip():
        parser.error("--api-key-file (TEXTGEN_API_KEY_FILE) is set but empty: name the key file, or unset it "
                     "to serve without keys")  # fmt: skip
    return keys


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's configuration: each of its (and `BatchConfig`'s) fields from the flag of the same name."""
    batch = BatchConfig(**_flag_values(args, BatchConfig))
    return EngineConfig(**_flag_values(args, EngineConfig), model=args.model or None, batch=batch)


def _flag_values(args: argparse.Namespace, config: type) -> dict[str, object]:
    """The flags named as `config`'s fields (`--max-queue-size` is `max_queue_size`), but the fields that
    need more than the flag's value (a model, TLS files, keys, hosts, another config)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(config)
        if hasattr(args, f.name) and f.name not in _READ_APART
    }


def grpc_server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The grpc.aio server's options: message and metadata limits, keepalive, connection age."""
    options = [
        ("grpc.max_receive_message_length", config.max_request_bytes),
        # The soft limit refuses a share of calls between it and the hard one; equal, it refuses all above.
        ("grpc.max_metadata_size", config.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", config.max_metadata_bytes),
        ("grpc.keepalive_time_ms", SERVER_PING_INTERVAL_S * 1000),
        ("grpc.keepalive_timeout_ms", SERVER_PING_TIMEOUT_S * 1000),
        ("grpc.http2.max_pings_without_data", 0),  # ping on through a call silent for minutes
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_S * 1000),
        ("grpc.http2.max_ping_strikes", 2),  # pings more often than that, three times: GOAWAY too_many_pings
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        ("grpc.server_handshake_timeout_ms", round(config.idle_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", round(config.idle_timeout_s * 1000)),
    ]
    if config.max_connection_age_s:
        options += [
            ("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace_s * 1000)),
        ]
    return options
