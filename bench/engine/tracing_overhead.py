"""`python -m bench.engine.tracing_overhead`: what telemetry costs the engine's step loop.

One engine runs the same offline workload under each observer in turn, interleaved, `--repeats` times; the
table gives the median time, the ratio to the plain `EngineObserver` and the extra time per engine step.
The default model is a tiny random-weight llama (2 layers, hidden size 64) whose steps take milliseconds on
a CPU, so hook costs show far more than they would next to a real model's steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import torch
import transformers
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from transformers import AutoTokenizer

from bench.report import markdown_table
from engine.batching import BatchConfig
from engine.core.observer import EngineObserver
from engine.execution.loader import default_model_dir
from engine.frontend.engine import Engine, EngineConfig
from engine.request import StoppingParams
from telemetry.server import Telemetry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine.tracing_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default=None, help="local model directory (default: a tiny random llama)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    return parser


def save_tiny_model(path: str) -> None:
    """A 2-layer llama with random weights and the SmolLM2 tokenizer, saved to `path`."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


class EncodingExporter(SpanExporter):
    """Encodes spans to OTLP protobuf as the OTLP exporter does, then drops them: its CPU cost, no network."""

    def export(self, spans) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        return SpanExportResult.SUCCESS


def observers(engine: Engine) -> dict[str, EngineObserver]:
    """Each configuration's observer, attached to `engine` as the server attaches it."""
    traced = TracerProvider()
    traced.add_span_processor(BatchSpanProcessor(EncodingExporter()))
    configurations = {
        "telemetry off (no OTEL_* exporter, --metrics-port 0)": Telemetry(),
        "metrics only (the server's default)": Telemetry(meter_provider=_meter_provider()),
        "metrics, tracing sampled out (always_off)": Telemetry(TracerProvider(ALWAYS_OFF), _meter_provider()),
        "metrics, tracing every request (OTLP-encoded)": Telemetry(traced, _meter_provider()),
    }
    for telemetry in configurations.values():
        telemetry.attach(engine)
    plain = {"plain EngineObserver": EngineObserver()}
    return plain | {name: telemetry.observer for name, telemetry in configurations.items()}


def _meter_provider() -> MeterProvider:
    return MeterProvider(metric_readers=[InMemoryMetricReader()])


class TimedObserver(EngineObserver):
    """Wraps an observer and adds up the time spent in its hooks: what it takes from the step loop."""

    def __init__(self, inner: EngineObserver) -> None:
        self.inner = inner
        self.ns = 0
        self.steps = 0

    def _time(self, hook: Callable, *args) -> None:
        start = time.perf_counter_ns()
        hook(*args)
        self.ns += time.perf_counter_ns() - start

    def request_queued(self, seq) -> None:
        self._time(self.inner.request_queued, seq)

    def request_admitted(self, seq) -> None:
        self._time(self.inner.request_admitted, seq)

    def first_token(self, seq) -> None:
        self._time(self.inner.first_token, seq)

    def request_preempted(self, seq) -> None:
        self._time(self.inner.request_preempted, seq)

    def request_finished(self, seq, error) -> None:
        self._time(self.inner.request_finished, seq, error)

    def step_finished(self, step, start, end, kv_used, kv_total) -> None:
        self.steps += 1
        self._time(self.inner.step_finished, step, start, end, kv_used, kv_total)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tiny-llama-") as tiny:
        if args.model is None:
            save_tiny_model(tiny)
        config = EngineConfig(
            model=args.model or tiny, device=args.device, dtype=args.dtype, batch=BatchConfig()
        )
        engine = Engine(config)  # loads everything: the directory can go
    engine.start()
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(
        3, engine.model_info.vocab_size, (args.num_requests, args.prompt_len), generator=generator
    )
    stopping = StoppingParams(max_new_tokens=args.output_len, ignore_eos=True)

    def run() -> float:
        start = time.perf_counter()
        engine.generate(prompts.tolist(), stopping=stopping)
        return time.perf_counter() - start

    try:
        run()  # warm-up
        # The observer is swapped on one engine, between runs, so every configuration runs the same weights.
        timed = {name: TimedObserver(observer) for name, observer in observers(engine).items()}
        times: dict[str, list[float]] = {name: [] for name in timed}
        for _ in range(args.repeats):
            for name, observer in timed.items():
                engine.core.observer = observer
                times[name].append(run())
    finally:
        engine.shutdown()
    print(report(times, timed, args, engine))


def report(times: dict[str, list[float]], timed: dict[str, TimedObserver], args, engine: Engine) -> str:
    plain = statistics.median(times["plain EngineObserver"])
    rows = []
    for name, observer in timed.items():
        median = statistics.median(times[name])
        hook_us = observer.ns / observer.steps / 1e3
        step_us = median / (observer.steps / args.repeats) * 1e6
        rows.append([name, median, f"{median / plain:.3f}", f"{hook_us:.1f}", f"{hook_us / step_us:.2%}"])
    info = engine.model_info
    spread = (max(times["plain EngineObserver"]) - min(times["plain EngineObserver"])) / plain
    steps = timed["plain EngineObserver"].steps // args.repeats
    return (
        f"\n{args.num_requests} requests x ({args.prompt_len} prompt + {args.output_len} output tokens), "
        f"{steps} engine steps per run, median of {args.repeats} runs; {info.name} on {info.device} "
        f"({info.dtype}), {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs; run-to-run "
        f"spread of the plain observer {spread:.1%}\n\n"
        + markdown_table(["observer", "median s", "vs plain", "hooks us/step", "hooks / step time"], rows)
    )


if __name__ == "__main__":
    main()
