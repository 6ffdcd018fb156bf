"""SIGTERM: `python -m service` stops taking requests, finishes the ones in flight, and exits 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.server import ServerProcess
from bench.stress.process import server_args
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
NUM_DRAIN_CONNECTIONS = 4


def start_service(model_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Run `python -m service` on a free port; returns the process and its target once it is SERVING."""
    args = ["--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1"]
    args += ["--port", "0", "--metrics-port", "0", "--num-kv-blocks", "256", "--grace-period-s", "60"]
    log = log_path.open("w")
    process = subprocess.Popen([sys.executable, "-m", "service", *args], cwd=REPO, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    target = None
    while True:
        assert process.poll() is None, f"the server exited early:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"the server did not start:\n{log_path.read_text()}"
        if target is None:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
            target = match and f"127.0.0.1:{match.group(1)}"
        if target and health(target) == health_pb2.HealthCheckResponse.SERVING:
            return process, target
        time.sleep(0.2)


def health(target: str) -> int | None:
    with grpc.insecure_channel(target) as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            )
        except grpc.RpcError:
            return None


def test_sigterm_finishes_the_request_in_flight_and_exits_zero(tiny_model_dir, tmp_path):
    process, target = start_service(tiny_model_dir("llama"), tmp_path / "server.log")
    try:
        with grpc.insecure_channel(target) as channel:
            stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
            in_flight = stub.GenerateStream(
                pb.GenerateRequest(
                    prompt="Once", stopping=pb.StoppingCriteria(max_new_tokens=400, ignore_eos=True)
                ),
                timeout=120,
            )
            messages = [next(in_flight)]

            os.kill(process.pid, signal.SIGTERM)
            time.sleep(0.2)
            draining_health = health(target)
            try:
                stub.Generate(pb.GenerateRequest(prompt="too late"), timeout=10)
                late_code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                late_code = error.code()
            messages += list(in_flight)

        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = (tmp_path / "server.log").read_text()

    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH, log
    assert sum(len(m.tokens) for m in messages) == messages[-1].usage.completion_tokens == 400
    assert draining_health == health_pb2.HealthCheckResponse.NOT_SERVING
    assert late_code == grpc.StatusCode.UNAVAILABLE
    assert "draining: 1 requests in flight" in log


async def test_new_calls_get_unavailable_through_the_end_of_a_drain(tiny_model_dir, tmp_path):
    """Calls keep arriving, on several connections, until the process has exited; the drain's last
    instants (the last request finishes, the server stops) must answer them UNAVAILABLE, never CANCELLED."""
    args = server_args(str(tiny_model_dir("llama")), "--grace-period-s", "60")
    with ServerProcess(args, tmp_path / "server.log") as server:
        channels = [grpc.aio.insecure_channel(server.target) for _ in range(NUM_DRAIN_CONNECTIONS)]
        stubs = [textgen_pb2_grpc.TextGenerationServiceStub(channel) for channel in channels]
        in_flight = stubs[0].GenerateStream(
            pb.GenerateRequest(
                prompt="Once", stopping=pb.StoppingCriteria(max_new_tokens=60, ignore_eos=True)
            ),
            timeout=60,
        )
        streamed = [await in_flight.read()]
        server.process.send_signal(signal.SIGTERM)
        exited = asyncio.ensure_future(asyncio.to_thread(server.process.wait, 60))

        async def keep_calling(stub) -> list[str]:
            codes = []
            while not exited.done():
                try:
                    await stub.Generate(pb.GenerateRequest(prompt="late"), timeout=10)
                    codes.append("OK")
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code().name)
            return codes

        late = await asyncio.gather(*(keep_calling(stub) for stub in stubs for _ in range(4)))
        while (message := await in_flight.read()) is not grpc.aio.EOF:
            streamed.append(message)
        for channel in channels:
            await channel.close()
    codes = Counter(code for codes in late for code in codes)

    assert await exited == 0
    assert streamed[-1].usage.completion_tokens == 60
    assert set(codes) == {"UNAVAILABLE"}, codes
