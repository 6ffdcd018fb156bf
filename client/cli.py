"""`python -m client "prompt"`: generate from the command line, printing text as it comes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

import grpc
from opentelemetry import trace

from client.channel import tls_credentials
from client.params import GenerateParams
from client.results import Completion, FinishReason, StreamChunk, Timing, Token, Usage
from client.sync import TextGenClient
from telemetry.exporters import tracer_provider_from_env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client", description="Generate text with a textgen server."
    )
    parser.add_argument("prompt", help="the prompt, or with --chat the user's message")
    parser.add_argument("--target", default="localhost:50051", help="server address (default: %(default)s)")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message through the model's chat template",
    )
    parser.add_argument("--system", help="with --chat, a system message before the user's")
    parser.add_argument(
        "--max-new-tokens", type=int, default=0, help="tokens to generate (default: the server's)"
    )
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: greedy)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument("--stop", action="append", default=[], help="a stop sequence (repeatable)")
    parser.add_argument(
        "--n", type=int, default=1, help="completions to generate; each is printed under its index"
    )
    parser.add_argument("--timeout", type=float, help="deadline in seconds")
    parser.add_argument(
        "--top-logprobs",
        type=int,
        default=0,
        help="after the text, list each token with its N likeliest alternatives",
    )
    output = parser.add_argument_group("structured output (one of)")
    output.add_argument(
        "--json-schema", help="a JSON schema the output must validate against, or @FILE holding one"
    )
    output.add_argument("--regex", help="a regular expression the whole output must match")
    output.add_argument("--choice", action="append", help="a string the output may be (repeatable)")
    parser.add_argument(
        "--prompt-logprobs",
        action="store_true",
        help="after the text, list each prompt token's log-probability",
    )
    security = parser.add_argument_group("security")
    security.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    security.add_argument("--tls-ca-file", help="connect with TLS, trusting the CAs in this PEM file")
    security.add_argument("--tls-cert-file", help="with TLS, present this PEM client certificate (mTLS)")
    security.add_argument("--tls-key-file", help="the PEM private key of --tls-cert-file")
    security.add_argument(
        "--api-key",
        help="send this API key (default: $TEXTGEN_API_KEY, which other users cannot read from the "
        "process list, unlike this flag)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        parser.error("--tls-cert-file and --tls-key-file go together")
    if (provider := tracer_provider_from_env("textgen-client")) is not None:
        trace.set_tracer_provider(provider)  # OTEL_TRACES_EXPORTER set: trace the call; spans export at exit
    if sum(value is not None for value in (args.json_schema, args.regex, args.choice)) > 1:
        parser.error("--json-schema, --regex and --choice exclude each other")
    try:
        json_schema = _read_at_file(args.json_schema)
    except OSError as e:
        parser.error(f"--json-schema: {e}")
    inputs = {"prompt": args.prompt}
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        inputs = {"messages": [*system, {"role": "user", "content": args.prompt}]}
    # The flags named as `GenerateParams` fields are those fields; --stop and --json-schema need more.
    params = {f.name: getattr(args, f.name) for f in fields(GenerateParams) if hasattr(args, f.name)}
    params.update(stop_sequences=args.stop, json_schema=json_schema, timeout=args.timeout)
    credentials = None
    if args.tls or args.tls_ca_file or args.tls_cert_file:
        credentials = tls_credentials(args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
    with TextGenClient(args.target, credentials=credentials, api_key=args.api_key) as client:
        try:
            if args.n > 1:
                print_completions(
                    client, inputs, params, args.stream, bool(args.top_logprobs), args.prompt_logprobs
                )
                return 0
            if args.stream:
                tokens, prompt_tokens = [], []
                for chunk in client.stream(**inputs, **params):
                    print(chunk.text, end="", flush=True)
                    tokens += chunk.tokens
                    prompt_tokens += chunk.prompt_tokens
                    last = chunk
            else:
                last = client.generate(**inputs, **params)
                tokens, prompt_tokens = last.tokens, last.prompt_tokens
                print(last.text, end="")
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print()
    if args.prompt_logprobs:
        print("\n".join(["prompt logprobs:", *logprob_lines(prompt_tokens)]))
    if args.top_logprobs:
        print("\n".join(["logprobs:", *logprob_lines(tokens)]))
    print(summary(last.finish_reason, last.usage, last.timing), file=sys.stderr)
    return 0


def _read_at_file(value: str | None) -> str | None:
    """`@path` is the text of that file (a schema is easier to keep in one), anything else itself."""
    if value is not None and value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    return value


def logprob_lines(tokens: Sequence[Token]) -> list[str]:
    """One line per token: its text and log-probability, then its alternatives' (if any were asked for)."""
    lines = []
    for token in tokens:
        alternatives = "  ".join(f"{a.text!r} {a.logprob:.3f}" for a in token.top_logprobs)
        lines.append(
            f"  {token.text!r} {token.logprob:.3f}" + (f"  | {alternatives}" if alternatives else "")
        )
    return lines


def print_completions(
    client: TextGenClient, inputs: dict, params: dict, stream: bool, top_logprobs: bool, prompt_logprobs: bool
) -> None:
    """Print each of several completions under its index (a streamed one as soon as it finishes), with its
    tokens' log-probabilities if asked for; then the scored prompt, once (the completions share it)."""
    prompt_tokens: list[Token] = []
    if stream:
        texts: dict[int, str] = {}
        tokens: dict[int, list[Token]] = {}
        for chunk in client.stream(**inputs, **params):
            texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
            tokens.setdefault(chunk.index, []).extend(chunk.tokens)
            prompt_tokens += chunk.prompt_tokens
            if chunk.finished:
                print_completion(
                    chunk.index, texts[chunk.index], chunk, tokens[chunk.index] if top_logprobs else []
                )
    else:
        result = client.generate(**inputs, **params)
        prompt_tokens = result.prompt_tokens
        for completion in result.completions:
            print_completion(
                completion.index, completion.text, completion, completion.tokens if top_logprobs else []
            )
    if prompt_logprobs:
        print("\n".join(["prompt logprobs:", *logprob_lines(prompt_tokens)]))


def print_completion(index: int, text: str, end: Completion | StreamChunk, tokens: Sequence[Token]) -> None:
    print(f"--- completion {index} ---\n{text}", flush=True)
    if tokens:
        print("\n".join(["logprobs:", *logprob_lines(tokens)]), flush=True)
    print(summary(end.finish_reason, end.usage, end.timing), file=sys.stderr, flush=True)


def summary(finish_reason: FinishReason | None, usage: Usage | None, timing: Timing | None) -> str:
    """One line: why it stopped, token counts, time to first token and total time."""
    reason = finish_reason.value if finish_reason else "?"
    if usage is None or timing is None:
        return f"[{reason}]"
    cached = f" ({usage.cached_prompt_tokens} cached)" if usage.cached_prompt_tokens else ""
    return (
        f"[{reason}] {usage.prompt_tokens} prompt{cached} + {usage.completion_tokens} completion tokens, "
        f"first token {timing.time_to_first_token_s:.3f} s, total {timing.total_s:.3f} s"
    )
