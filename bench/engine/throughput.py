"""`make bench-engine`: offline throughput of the engine next to transformers' static batched `generate`.

Both run the same seeded requests (lognormal prompt and output lengths, greedy, EOS ignored) in the same
process, one after the other; `generate` gets all requests in one left-padded batch that decodes until
the longest output is done, and only each request's own tokens count as output.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence

import torch

from bench.peers import hf_generate
from bench.report import environment, load_note, markdown_table
from bench.workload import WorkloadConfig, make_workload, prompt_ids
from engine.batching import BatchConfig
from engine.execution.packed_linear import WEIGHT_FORMATS
from engine.frontend.engine import Engine, EngineConfig
from engine.request import StoppingParams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine.throughput",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--num-requests", type=int, default=32, help="requests, all submitted at once")
    parser.add_argument("--prompt-len", type=float, default=64, help="mean prompt tokens")
    parser.add_argument("--output-len", type=float, default=64, help="mean output tokens")
    parser.add_argument("--len-sigma", type=float, default=0.5, help="lognormal sigma of lengths")
    parser.add_argument("--seed", type=int, default=0, help="workload seed: lengths and prompts")
    parser.add_argument(
        "--model", default=None, help="local model directory; unset = the default SmolLM2-135M"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument(
        "--weight-format", default="auto", choices=WEIGHT_FORMATS, help="the engine's --weight-format"
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="engine's max batch size")
    parser.add_argument(
        "--hf-batch-size", type=int, default=0, help="generate's batch size (0 = all requests)"
    )
    return parser


def run_engine(
    engine: Engine, prompts: Sequence[list[int]], output_lens: Sequence[int]
) -> hf_generate.OfflineResult:
    """All requests through `engine.generate` at once, after a short warm-up; checks every output length."""
    engine.generate([prompts[0]] * 2, stopping=StoppingParams(max_new_tokens=4, ignore_eos=True))
    stopping = [StoppingParams(max_new_tokens=n, ignore_eos=True) for n in output_lens]
    start = time.perf_counter()
    results = engine.generate(list(prompts), stopping=stopping)
    duration = time.perf_counter() - start
    produced = [r.completion_tokens for r in results]
    assert produced == list(output_lens), "the engine did not generate exactly the requested lengths"
    return hf_generate.OfflineResult(
        duration, len(prompts), sum(map(len, prompts)), sum(produced), sum(produced)
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    load_before = os.getloadavg()[0]
    config = WorkloadConfig(
        num_requests=args.num_requests,
        request_rate=math.inf,
        prompt_len_mean=args.prompt_len,
        output_len_mean=args.output_len,
        len_sigma=args.len_sigma,
        seed=args.seed,
    )
    specs = make_workload(config)
    output_lens = [s.output_len for s in specs]

    engine = Engine(
        EngineConfig(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            batch=BatchConfig(max_batch_size=args.max_batch_size),
            weight_format=args.weight_format,
        )
    )
    engine.start()
    try:
        prompts = [
            prompt_ids(s, lambda text: engine.tokenizer.encode(text, add_special_tokens=False)) for s in specs
        ]
        ours = run_engine(engine, prompts, output_lens)
        device, dtype = engine.model_runner.device, engine.model_runner.dtype
    finally:
        engine.shutdown()

    hf_model, tokenizer = hf_generate.load_hf_model(
        args.model, str(device), str(dtype).removeprefix("torch.")
    )
    pad = hf_generate.pad_token_id_of(tokenizer)
    hf_generate.generate_static_batch(hf_model, [prompts[0]] * 2, 4, pad)
    batch_size = args.hf_batch_size or len(prompts)
    theirs = hf_generate.run_static_batches(hf_model, prompts, output_lens, batch_size, pad)

    print(
        f"\n{len(specs)} requests, prompt ~{args.prompt_len:g} / output ~{args.output_len:g} tokens "
        f"(lognormal sigma {args.len_sigma:g}, seed {args.seed}; {ours.prompt_tokens} prompt and "
        f"{ours.output_tokens} output tokens), greedy, EOS ignored; {device}, {dtype}, "
        f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs\n"
    )
    headers = ["system", "time s", "output tok/s", "req/s", "computed output tokens"]
    rows = [
        [
            f"textgen engine (max batch {args.max_batch_size})",
            ours.duration_s,
            ours.output_throughput,
            ours.request_throughput,
            ours.computed_output_tokens,
        ],
        [
            f"transformers generate (static batch {batch_size})",
            theirs.duration_s,
            theirs.output_throughput,
            theirs.request_throughput,
            theirs.computed_output_tokens,
        ],
    ]
    print(markdown_table(headers, rows))
    print(
        f"\nengine / transformers output throughput: {ours.output_throughput / theirs.output_throughput:.2f}x"
    )
    print(load_note(environment(load_before)))


if __name__ == "__main__":
    main()
