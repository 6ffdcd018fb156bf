"""Stress scenarios on `python -m service` in a subprocess: SIGTERM during load, and a soak.

A subprocess is what a signal and a process's own resources need: the drain ends in `exit`, and the soak
reads the server's resident memory, open file descriptors and threads from /proc.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.server import ServerProcess
from bench.stress.calls import Outcome, prompt_ids, request, serving, stream, unary
from bench.stress.report import ScenarioResult, by_count, p99
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc


def server_args(model: str, *flags: str) -> list[str]:
    """`python -m service` flags for a CPU float32 server on loopback, without a metrics endpoint."""
    return ["--model", model, "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1",
            "--metrics-port", "0", "--num-kv-blocks", "1024", *flags]  # fmt: skip


async def sigterm_during_load(
    model: str,
    log_dir: Path,
    num_streams: int = 48,
    max_batch_size: int = 16,
    max_new_tokens: int = 64,
    grace_period_s: float = 60.0,
) -> ScenarioResult:
    """`num_streams` streams, `max_batch_size` decoding and the rest queued, then SIGTERM; new calls keep
    arriving until the process exits. The server's log says how many it still had in flight then."""
    result = ScenarioResult(
        f"SIGTERM during load: {num_streams} streams ({max_batch_size} decoding, the rest queued), "
        f"--grace-period-s {grace_period_s:g}"
    )
    rng = random.Random(0)
    flags = ["--grace-period-s", str(grace_period_s), "--max-batch-size", str(max_batch_size)]
    log_path = log_dir / "sigterm-server.log"
    with ServerProcess(server_args(model, *flags), log_path) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            started = asyncio.Semaphore(0)
            in_flight = [
                asyncio.ensure_future(
                    stream(
                        stub,
                        request(prompt_ids(rng, 16), max_new_tokens),
                        600,
                        on_first_message=started.release,
                    )
                )
                for _ in range(num_streams)
            ]
            for _ in range(min(num_streams, max_batch_size)):
                await started.acquire()
            await asyncio.sleep(0.1)  # the queued ones were sent with the others: the server has them
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            exited = asyncio.ensure_future(asyncio.to_thread(server.process.wait, grace_period_s + 30))
            late, health = [], []
            while not exited.done():
                late.append(await unary(stub, request(prompt_ids(rng, 8), 4), 10))
                health.append(await _health(channel))
                await asyncio.sleep(0.05)
            exit_code = await exited
            drain_s = time.monotonic() - signalled
            outcomes = await asyncio.gather(*in_flight)
    draining = re.search(r"draining: (\d+) requests in flight", log_path.read_text())
    accepted = int(draining.group(1)) if draining else -1
    complete = [o for o in outcomes if o.ok and len(o.token_ids) == max_new_tokens]
    result.check(
        "every stream in flight completes (zero lost)",
        len(complete) == num_streams,
        f"{by_count(o.code for o in outcomes)}; the server had {accepted} in flight at SIGTERM",
    )
    late_codes = [f"{o.code} ({o.reason or 'no reason: port closed'})" for o in late]
    result.check(
        "new calls get UNAVAILABLE (DRAINING, then the port closes)",
        late and all(o.code == "UNAVAILABLE" and o.reason in ("DRAINING", "") for o in late),
        by_count(late_codes),
    )
    result.check("health NOT_SERVING while draining", "SERVING" not in health, by_count(health))
    result.check(
        "exit 0 within the grace period",
        exit_code == 0 and drain_s <= grace_period_s,
        f"exit code {exit_code} after {drain_s:.1f} s",
    )
    result.figures = {
        "streams completed": f"{len(complete)}/{num_streams} ({accepted} in flight at SIGTERM)",
        "new calls": by_count(late_codes),
        "exit": f"{exit_code} after {drain_s:.1f} s",
    }
    return result


async def _health(channel: grpc.aio.Channel) -> str:
    try:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    except grpc.aio.AioRpcError as error:
        return error.code().name


@dataclass(slots=True)
class ProcessSample:
    """A process's resident memory, open file descriptors and threads at one moment."""

    at_s: float
    rss_mb: float
    fds: int
    threads: int


def sample_process(pid: int, at_s: float) -> ProcessSample:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_mb = int(fields["VmRSS"].split()[0]) / 1024
    return ProcessSample(at_s, rss_mb, len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"]))


# Soak traffic: each kind of call, and the codes it may end with.
SOAK_EXPECTED = {
    "stream": {"OK"},
    "unary": {"OK"},
    "sampled": {"OK"},
    "stop sequence": {"OK"},
    "cancelled": {"CANCELLED", "OK"},
    "short deadline": {"DEADLINE_EXCEEDED", "OK"},
    "invalid": {"INVALID_ARGUMENT"},
    "tokenize": {"OK"},
    "model info": {"OK"},
}


def _soak_call(stub: pb_grpc.TextGenerationServiceStub, kind: str, rng: random.Random) -> Callable:
    """A coroutine function running one call of `kind`."""
    ids = prompt_ids(rng, rng.randint(8, 128))
    n = rng.randint(4, 64)
    if kind == "stream":
        return lambda: stream(stub, request(ids, n), 120)
    if kind == "unary":
        return lambda: unary(stub, request(ids, n), 120)
    if kind == "sampled":
        sampling = pb.SamplingParameters(temperature=0.8, top_p=0.9, top_k=50, seed=rng.randrange(2**32))
        message = pb.GenerateRequest(
            prompt="Tell me a story", sampling=sampling, stopping=pb.StoppingCriteria(max_new_tokens=n)
        )
        return lambda: stream(stub, message, 120)
    if kind == "stop sequence":
        message = pb.GenerateRequest(
            prompt="One, two,", stopping=pb.StoppingCriteria(max_new_tokens=n, stop_sequences=["e", "."])
        )
        return lambda: unary(stub, message, 120)
    if kind == "cancelled":
        return lambda: stream(stub, request(ids, 256), 120, cancel_after_messages=rng.randint(1, 8))
    if kind == "short deadline":
        return lambda: unary(stub, request(ids, 256), rng.uniform(0.005, 0.05))
    if kind == "invalid":
        message = pb.GenerateRequest(prompt="x", sampling=pb.SamplingParameters(temperature=-1))
        return lambda: unary(stub, message, 30)
    if kind == "tokenize":
        return lambda: _rpc(stub.Tokenize(pb.TokenizeRequest(text="Hello soak " * n), timeout=30))
    return lambda: _rpc(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30))


async def _rpc(call) -> Outcome:
    start = time.monotonic()
    try:
        await call
        return Outcome("OK", time.monotonic() - start)
    except grpc.aio.AioRpcError as error:
        return Outcome(error.code().name, time.monotonic() - start, details=error.details() or "")


async def soak(
    model: str, log_dir: Path, minutes: float = 20.0, concurrency: int = 8, sample_every_s: float = 10.0
) -> ScenarioResult:
    """Mixed traffic (`SOAK_EXPECTED`) from `concurrency` clients for `minutes`; the server's RSS, open file
    descriptors and threads sampled throughout. Drift: the end (idle, after traffic) minus the baseline
    (idle, after the first tenth of the run as warm-up)."""
    result = ScenarioResult(f"soak: {minutes:g} min of mixed traffic, {concurrency} clients")
    rng = random.Random(0)
    kinds = list(SOAK_EXPECTED)
    calls: list[tuple[str, Outcome]] = []
    samples: list[ProcessSample] = []
    with ServerProcess(server_args(model), log_dir / "soak-server.log") as server:
        pid = server.process.pid
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            start = time.monotonic()

            async def client(until: float) -> None:
                while time.monotonic() < until:
                    kind = rng.choice(kinds)
                    calls.append((kind, await _soak_call(stub, kind, rng)()))

            async def sampler(until: float) -> None:
                while time.monotonic() < until:
                    samples.append(sample_process(pid, time.monotonic() - start))
                    if int(samples[-1].at_s // 60) > int(samples[-2].at_s // 60 if len(samples) > 1 else 0):
                        last = samples[-1]
                        print(f"soak {last.at_s / 60:.0f} min: {len(calls)} calls, RSS {last.rss_mb:.0f} MB, "
                              f"{last.fds} fds, {last.threads} threads", file=sys.stderr)  # fmt: skip
                    await asyncio.sleep(sample_every_s)

            async def phase(seconds: float) -> ProcessSample:
                """Traffic for `seconds`, then the server's resources once it is idle again."""
                until = time.monotonic() + seconds
                await asyncio.gather(sampler(until), *(client(until) for _ in range(concurrency)))
                await asyncio.sleep(1.0)  # the last calls' teardown
                return sample_process(pid, time.monotonic() - start)

            baseline = await phase(minutes * 60 * 0.1)
            end = await phase(minutes * 60 * 0.9)
        health, code, _ = await serving(server.target)
    unexpected = [
        f"{kind}: {o.code} {o.details[:80]}" for kind, o in calls if o.code not in SOAK_EXPECTED[kind]
    ]
    result.check("no status but the expected ones", not unexpected, f"{len(unexpected)}: {unexpected[:5]}")
    rss_drift = end.rss_mb - baseline.rss_mb
    result.check("RSS flat (drift within 5%)", rss_drift <= 0.05 * baseline.rss_mb, f"{rss_drift:+.1f} MB")
    result.check("open file descriptors flat", end.fds <= baseline.fds, f"{baseline.fds} -> {end.fds}")
    result.check("threads flat", end.threads <= baseline.threads, f"{baseline.threads} -> {end.threads}")
    result.check(
        "then SERVING and answering",
        health == "SERVING" and code == "OK",
        f"health {health}, Generate {code}",
    )
    peak_mb = max(s.rss_mb for s in samples)
    result.figures = {
        "calls": f"{len(calls)} ({by_count(o.code for _, o in calls)})",
        "RSS": f"{baseline.rss_mb:.0f} -> {end.rss_mb:.0f} MB ({rss_drift:+.1f} MB; max {peak_mb:.0f} MB; "
        f"slope {_slope_per_hour(samples, baseline.at_s):+.1f} MB/h)",
        "fds": f"{baseline.fds} -> {end.fds}",
        "threads": f"{baseline.threads} -> {end.threads}",
        "p99 stream": p99(o.latency_s for kind, o in calls if kind == "stream" and o.ok),
    }
    return result


def _slope_per_hour(samples: list[ProcessSample], after_s: float) -> float:
    """Least-squares RSS growth per hour over the samples after the warm-up."""
    points = [(s.at_s, s.rss_mb) for s in samples if s.at_s >= after_s]
    if len(points) < 3:
        return 0.0
    at, rss = np.array(points).T
    return float(np.polyfit(at, rss, 1)[0] * 3600)
