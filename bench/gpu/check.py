"""`make bench-gpu`: the engine on one CUDA GPU, in one run that fits 8 minutes on an H100 / H200.

0. The toolchain Triton needs at run time: a C compiler and Python's headers (it builds its launcher).
1. The CUDA tests (`tests/test_cuda.py`, marker `cuda`) on the GPU.
2. The copy rate: a large device-to-device copy, bytes read plus bytes written per second.
3. Decode steps of random-weight Llama-3.2-1B and Llama-3-8B shapes at batch 1 / 8 / 64 (each sequence
   `--context` tokens in): the runner's step time with the torch and triton decode backends run eagerly
   and with triton replayed from CUDA graphs, and the fraction of the copy rate a step reaches (weight
   and KV bytes read per step, over the step time, over the copy rate).
4. Throughput: 64 requests at once through the engine and through transformers' `generate` (one static
   batch), Llama-3.2-1B shapes.

Nothing is downloaded: the models are built from configs in code (`bench.random_model`). `--smoke` runs
the same steps with tiny shapes on the CPU (the test suite checks the script end to end so); without
CUDA the "graphs" rows run the same padded static buffers eagerly. Every number comes from this run and
is saved as JSON beside the printed tables.

The run cannot pass silently: a missing compiler, a failed test, a test run that timed out, ran no test or
skipped one, a step that raised, or a sticky CUDA error (the context is lost; every later step would
fail) is an error in the JSON's `errors` and makes the exit status non-zero. The JSON is rewritten as each
step ends, so a run killed midway keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import math
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench.report import environment, markdown_table, to_json
from bench.workload import WorkloadConfig, make_workload

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("toolchain", "tests", "copy", "decode", "throughput")
CUDA_TESTS = "tests/test_cuda.py"


class StepFailed(RuntimeError):
    """A step that ran to its end and found a failure (its report says what)."""


@dataclass(slots=True, frozen=True)
class Plan:
    """What one run measures."""

    device: str
    dtype: torch.dtype
    shapes: tuple[str, ...]
    batches: tuple[int, ...]
    context: int  # tokens of each sequence before its timed decode steps
    warmup_steps: int
    timed_steps: int
    throughput_shape: str
    num_requests: int
    prompt_len: float
    output_len: float
    copy_bytes: int
    run_tests: bool
    engine_backends: tuple[str, ...]  # decode backends of the throughput runs


def full_plan() -> Plan:
    return Plan(
        device="cuda", dtype=torch.bfloat16, shapes=("llama-3.2-1b", "llama-3-8b"), batches=(1, 8, 64),
        context=512, warmup_steps=5, timed_steps=30, throughput_shape="llama-3.2-1b", num_requests=64,
        prompt_len=128, output_len=128, copy_bytes=1 << 30, run_tests=True,
        engine_backends=("torch", "triton"),
    )  # fmt: skip


def smoke_plan() -> Plan:
    return Plan(
        device="cpu", dtype=torch.float32, shapes=("tiny",), batches=(1, 2), context=24, warmup_steps=1,
        timed_steps=2, throughput_shape="tiny", num_requests=4, prompt_len=12, output_len=6,
        copy_bytes=1 << 24, run_tests=False, engine_backends=("torch",),  # Triton's interpreter is slow
    )  # fmt: skip


@dataclass(slots=True)
class DecodeRow:
    shape: str
    mode: str  # "torch eager", "triton eager", "triton graphs" ("triton padded" without CUDA)
    batch: int
    step_ms: float
    bytes_per_step: int
    copy_fraction: float | None  # None without the copy step


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_rate(plan: Plan) -> float:
    """Bytes read plus written per second by a device-to-device copy of `plan.copy_bytes` (median of 10)."""
    src = torch.randint(0, 255, (plan.copy_bytes,), dtype=torch.uint8, device=plan.device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        synchronize(plan.device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(plan.device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * plan.copy_bytes / statistics.median(times)


# What the run imports beyond the standard library (and what these bring: numpy, tokenizers, ...): what a
# GPU image with PyTorch holds, or gets with one pip install; nothing else of the server's
# (test_bench_gpu.py). llguidance: the engine's grammars (a wheel with no dependencies).
PACKAGES = ("torch", "triton", "transformers", "pytest", "llguidance")


def toolchain() -> dict:
    """What the run needs besides the GPU: its Python packages, and the C compiler and Python headers that
    Triton builds its launcher with at first use (else every launch fails; Triton takes $CC, else the
    first of clang, gcc and cc on PATH)."""
    compiler = os.environ.get("CC") or next(filter(None, map(shutil.which, ("clang", "gcc", "cc"))), None)
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    found = {"compiler": compiler, "python_headers": str(headers) if headers.exists() else None}
    problems = [f"no {name.replace('_', ' ')}" for name, path in found.items() if path is None]
    if problems:
        problems[-1] += " for Triton's launcher (install gcc and python3-dev, or set CC)"
    if missing := [name for name in PACKAGES if importlib.util.find_spec(name) is None]:
        problems.append(f"missing Python packages: {' '.join(missing)} (pip install {' '.join(missing)})")
    if problems:
        raise StepFailed("; ".join(problems))
    return found


def run_tests(paths: Sequence[str], device: str, timeout_s: float) -> dict:
    """The CUDA tests in a child process on `device` (no conftest: the GPU image lacks the server's
    dependencies); the result says what ran, and `error` why the run does not count as passed."""
    env = {**os.environ, "TEXTGEN_TEST_DEVICE": device}
    if device != "cpu":
        env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "--noconftest", "-p", "no:cacheprovider",
                   "-m", "cuda", f"--junitxml={junit}", *paths]  # fmt: skip
        start = time.perf_counter()
        try:
            result = subprocess.run(
                command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as timeout:
            print(_text(timeout.stdout)[-4000:] + _text(timeout.stderr)[-2000:], flush=True)
            seconds = time.perf_counter() - start
            return {"returncode": None, "seconds": seconds, "error": f"timed out after {timeout_s:g} s"}
        print(result.stdout[-4000:] + result.stderr[-2000:], flush=True)
        counts = _junit_counts(junit) if junit.exists() else {}
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    report = {"returncode": result.returncode, "summary": summary, **counts,
              "seconds": time.perf_counter() - start}  # fmt: skip
    report["error"] = _tests_error(report)
    return report


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _junit_counts(path: Path) -> dict:
    """Tests, failures, errors and skips (with their reasons) from pytest's JUnit XML."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    counts: dict = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in keys}
    counts["skip_reasons"] = sorted({skip.get("message", "") for skip in root.iter("skipped")})
    return counts


def _tests_error(report: dict) -> str | None:
    """Why a finished test run does not count as passed, or None."""
    code, tests = report["returncode"], report.get("tests", 0)
    if code == 5 or tests == 0:
        return f"no tests ran (pytest exit code {code})"
    if code != 0:
        return f"pytest exit code {code}: {report['summary']}"
    if report.get("skipped"):
        reasons = "; ".join(report["skip_reasons"])
        return f"{report['skipped']} of {tests} tests skipped, and every one must run here: {reasons}"
    return None


def check_device(device: str) -> None:
    """Raise if the CUDA context is broken: after an illegal memory access (a sticky error) every later
    call fails, so the run stops there instead of reporting a cascade."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.ones(1, device=device).add_(1).item()


def decode_rows(plan: Plan, shape: str, rate: float | None) -> list[DecodeRow]:
    """Step times of every mode and batch for `shape`, one model built per backend."""
    from bench.random_model import kv_bytes_per_token, parameter_bytes, random_model
    from engine.execution.model_runner import ModelRunner

    max_context = plan.context + plan.warmup_steps + plan.timed_steps + 16
    rows = []
    for backend in ("torch", "triton"):
        loaded = random_model(shape, torch.device(plan.device), plan.dtype, max_context)
        blocks = max(plan.batches) * -(-max_context // 16) + 16
        runner = ModelRunner(loaded, num_kv_blocks=blocks, attention_backend=backend, model_impl="lean")
        for padded in (False, True) if backend == "triton" else (False,):
            mode = f"{backend} eager"
            if padded:
                mode = f"{backend} graphs"
                if not runner.capture_decode_graphs(max(plan.batches), max_context):
                    runner.pad_decode_batches(max(plan.batches), max_context)  # no CUDA: same buffers
                    mode = f"{backend} padded"
            for batch in plan.batches:
                step_s = time_decode(runner, plan, batch)
                weights = parameter_bytes(shape, plan.dtype)
                mean_context = plan.context + (plan.warmup_steps + plan.timed_steps) / 2
                kv = int(batch * mean_context * kv_bytes_per_token(shape, plan.dtype))
                fraction = (weights + kv) / step_s / rate if rate else None
                rows.append(DecodeRow(shape, mode, batch, step_s * 1e3, weights + kv, fraction))
                print(f"{shape} {mode} batch {batch}: {step_s * 1e3:.3f} ms, {_percent(fraction)} of the "
                      "copy rate", flush=True)  # fmt: skip
        del runner, loaded
        free_memory()
    return rows


def time_decode(runner, plan: Plan, batch: int) -> float:
    """Median seconds of a decode step of `batch` sequences (the runner's whole step, host work included)."""
    from engine.core.step import StepRow

    rng = np.random.default_rng(batch)
    vocab = runner.vocab_size
    total = plan.context + plan.warmup_steps + plan.timed_steps
    inputs = []
    for _ in range(batch):
        table: list[int] = []
        assert runner.allocator.allocate(table, total)
        inputs.append(StepRow(rng.integers(3, vocab, plan.context).tolist(), 0, table))
    runner.run(inputs, is_prefill=True)
    times = []
    for step in range(plan.warmup_steps + plan.timed_steps):
        position = plan.context + step
        steps = [StepRow([int(rng.integers(3, vocab))], position, s.block_table) for s in inputs]
        synchronize(plan.device)
        start = time.perf_counter()
        runner.run(steps, is_prefill=False)
        synchronize(plan.device)
        if step >= plan.warmup_steps:
            times.append(time.perf_counter() - start)
    for item in inputs:
        runner.allocator.free(item.block_table)
    return statistics.median(times)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def throughput_rows(plan: Plan) -> list[dict]:
    """`plan.num_requests` requests at once through the engine (both backends) and transformers' generate."""
    from transformers import AutoModelForCausalLM

    from bench.engine.throughput import run_engine
    from bench.peers import hf_generate
    from bench.random_model import save_random_model
    from engine.batching import BatchConfig
    from engine.frontend.engine import Engine, EngineConfig

    workload = WorkloadConfig(
        num_requests=plan.num_requests, request_rate=math.inf, prompt_len_mean=plan.prompt_len,
        output_len_mean=plan.output_len, seed=0,
    )  # fmt: skip
    specs = make_workload(workload)
    rng = np.random.default_rng(0)
    output_lens = [s.output_len for s in specs]
    max_context = max(s.prompt_len + s.output_len for s in specs) + 16
    dtype_name = str(plan.dtype).removeprefix("torch.")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_model(plan.throughput_shape, Path(tmp), torch.device(plan.device), plan.dtype,
                                 max_context)  # fmt: skip
        free_memory()
        prompts = [rng.integers(3, 100, s.prompt_len).tolist() for s in specs]
        for backend in plan.engine_backends:
            config = EngineConfig(
                model=str(path), device=plan.device, dtype=dtype_name, attention_backend=backend,
                batch=BatchConfig(max_batch_size=plan.num_requests, max_batch_tokens=8192),
                num_kv_blocks=plan.num_requests * -(-max_context // 16) + 16,
            )  # fmt: skip
            engine = Engine(config)
            engine.start()
            try:
                graphs = engine.model_runner.cuda_graphs
                result = run_engine(engine, prompts, output_lens)
            finally:
                engine.shutdown()
            label = f"textgen engine, {backend} decode" + (", CUDA graphs" if graphs else ", eager")
            rows.append(_throughput_row(label, result))
            del engine
            free_memory()
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=plan.dtype).to(plan.device).eval()
        hf_generate.generate_static_batch(hf_model, [prompts[0]] * 2, 4, 0)
        result = hf_generate.run_static_batches(hf_model, prompts, output_lens, len(prompts), 0)
        rows.append(_throughput_row(f"transformers generate (static batch {len(prompts)})", result))
        del hf_model
        free_memory()
    return rows


def _throughput_row(label: str, result) -> dict:
    row = {"system": label, **result.to_dict()}
    print(f"{label}: {result.output_throughput:.1f} output tok/s", flush=True)
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.check", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script")
    parser.add_argument("--steps", help=f"the steps to run, comma-separated, of {','.join(STEPS)} "
                        "(default: all; --smoke leaves out tests: make test runs them itself)")  # fmt: skip
    parser.add_argument("--tests", nargs="+", default=[CUDA_TESTS], help="the test files of the tests step")
    parser.add_argument("--tests-timeout-s", type=float, default=300, help="the tests step's time limit")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json", help="JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    plan = smoke_plan() if args.smoke else full_plan()
    steps = args.steps.split(",") if args.steps else [s for s in STEPS if s != "tests" or plan.run_tests]
    if unknown := set(steps) - set(STEPS):
        raise SystemExit(f"unknown steps {', '.join(sorted(unknown))}: choose from {', '.join(STEPS)}")
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: `python -m bench.gpu.check --smoke` runs tiny shapes on the CPU")
    if plan.device == "cpu":  # Triton's interpreter is chosen when triton is first imported: not yet
        os.environ.setdefault("TRITON_INTERPRET", "1")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    report: dict = {"plan": {**asdict(plan), "dtype": str(plan.dtype)}, "steps": steps}
    report["environment"] = environment(load_before)
    if plan.device == "cuda":
        report["environment"]["gpu"] = torch.cuda.get_device_name()
    report.update(errors={}, decode=[], throughput=[])

    def save() -> None:
        report["seconds"] = time.perf_counter() - started
        report["environment"]["load_average_after"] = os.getloadavg()[0]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(to_json(report))

    def attempt(name: str, step: Callable[[], None]) -> bool:
        """Run `step`, recording an error rather than raising it: a failed step must not cost the later
        ones their device time. False if the device is lost (a sticky CUDA error): nothing after can run."""
        try:
            step()
        except Exception as error:
            traceback.print_exc()
            report["errors"][name] = str(error) if isinstance(error, StepFailed) else repr(error)
            free_memory()
        try:
            check_device(plan.device)
        except Exception as error:
            report["errors"]["cuda"] = f"the CUDA context is lost after step {name}: {error!r}"
            return False
        finally:
            save()  # after every step: a run killed later keeps this one
        return True

    def tests() -> None:
        report["tests"] = result = run_tests(args.tests, plan.device, args.tests_timeout_s)
        if result["error"]:
            raise StepFailed(result["error"])

    def copy() -> None:
        report["copy_rate_bytes_per_s"] = rate = copy_rate(plan)
        print(f"device-to-device copy: {rate / 1e9:.1f} GB/s (read + write)", flush=True)

    def decode(shape: str) -> None:
        rate = report.get("copy_rate_bytes_per_s")
        report["decode"] += [asdict(row) for row in decode_rows(plan, shape, rate)]

    def throughput() -> None:
        report["throughput"] = throughput_rows(plan)

    runs = {
        "toolchain": [("toolchain", lambda: report.update(toolchain=toolchain()))],
        "tests": [("tests", tests)],
        "copy": [("copy", copy)],
        "decode": [(f"decode {shape}", functools.partial(decode, shape)) for shape in plan.shapes],
        "throughput": [("throughput", throughput)],
    }
    for name, step in (run for s in steps for run in runs[s]):
        if not attempt(name, step):
            break
    print_report(report)
    print(f"\nsaved {args.out}")
    if report["errors"]:
        raise SystemExit(f"failed: {', '.join(report['errors'])}")
    return report


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.1%}"


def print_report(report: dict) -> None:
    plan, env = report["plan"], report["environment"]
    where = env.get("gpu") or f"CPU ({env['cpu_count']} cores)"
    print(f"\n{where}, torch {env['torch']}, {plan['dtype']}; {report['seconds']:.0f} s in all")
    if report.get("toolchain"):
        print(
            f"Triton's toolchain: {report['toolchain']['compiler']}, {report['toolchain']['python_headers']}"
        )
    if report.get("tests"):
        tests = report["tests"]
        print(f"CUDA tests: {tests.get('summary', '-')} (exit code {tests['returncode']})")
    for name, error in report["errors"].items():
        print(f"FAILED {name}: {error}")
    if report.get("copy_rate_bytes_per_s"):
        print(f"device-to-device copy: {report['copy_rate_bytes_per_s'] / 1e9:.1f} GB/s (read + write)")
    print()
    headers = ["shape", "decode", "batch", "step ms", "MB read per step", "of the copy rate"]
    rows = [
        [r["shape"], r["mode"], r["batch"], f"{r['step_ms']:.3f}", f"{r['bytes_per_step'] / 1e6:.4g}",
         _percent(r["copy_fraction"])]
        for r in report["decode"]
    ]  # fmt: skip
    print(markdown_table(headers, rows))
    print()
    headers = ["system", "time s", "output tok/s", "req/s"]
    rows = [[r["system"], r["duration_s"], r["output_throughput"], r["request_throughput"]]
            for r in report["throughput"]]  # fmt: skip
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
