"""Stress scenario: an unauthenticated flood of `python -m service` (with API keys), from /proc's view.

What a stranger without a key can make the server hold: health `Watch` streams with huge service names
(refused at once, a long one unparsed), and silent connections to the gRPC, HTTP and metrics
ports (no thread each, all closed by the server after `--idle-timeout-s`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.server import ServerProcess, free_port
from bench.stress.process import ProcessSample, sample_process, server_args
from bench.stress.report import ScenarioResult, by_count
from service.memory import TRIM_DELAY_S

KEY = "stress-flood-key-0123456789"
WATCH_BUDGET_MB = 50.0  # what a flood of Watch streams may add to the server's resident memory
SETTLE_S = 2 * TRIM_DELAY_S  # the server gives the flood's heap pages back TRIM_DELAY_S after it


async def unauthenticated_flood(
    model: str,
    log_dir: Path,
    num_watches: int = 200,
    name_bytes: int = 1024 * 1024,
    num_idle: int = 500,
    idle_timeout_s: float = 5.0,
) -> ScenarioResult:
    """`num_watches` Watch streams at once, each naming a distinct `name_bytes` service (twice), then
    `num_idle` silent connections to each port in turn; the server's RSS, threads and fds throughout."""
    result = ScenarioResult(
        f"unauthenticated flood: {num_watches} health Watch streams with {name_bytes // 1024} KiB names, "
        f"{num_idle} silent connections to each port, --idle-timeout-s {idle_timeout_s:g}"
    )
    key_file = log_dir / "flood-api-keys"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(KEY + "\n")
    http_port, metrics_port = free_port(), free_port()
    flags = ["--api-key-file", str(key_file), "--http-port", str(http_port)]
    args = server_args(model, *flags, "--idle-timeout-s", str(idle_timeout_s))
    args[args.index("--metrics-port") + 1] = str(metrics_port)
    with ServerProcess(args, log_dir / "flood-server.log") as server:
        pid = server.process.pid
        start = time.monotonic()
        before = sample_process(pid, 0.0)
        codes = await _watch_flood(server.target, num_watches, name_bytes)
        await asyncio.sleep(SETTLE_S)  # what a flood costs is what the server still holds after it
        after_watches = sample_process(pid, time.monotonic() - start)
        codes += await _watch_flood(server.target, num_watches, name_bytes)
        await asyncio.sleep(SETTLE_S)
        after_second = sample_process(pid, time.monotonic() - start)
        refused = ("INVALID_ARGUMENT", "NOT_FOUND")  # a name over MAX_REQUEST_BYTES, or one not served
        result.check(
            "every Watch of an unknown name is refused at once",
            all(code in refused for code in codes),
            by_count(codes),
        )
        rss_mb = after_watches.rss_mb - before.rss_mb
        second_mb = after_second.rss_mb - after_watches.rss_mb
        result.check(
            f"a Watch flood adds < {WATCH_BUDGET_MB:g} MB RSS, the first and the second",
            rss_mb < WATCH_BUDGET_MB and second_mb < WATCH_BUDGET_MB,
            f"{rss_mb:+.0f} MB, then {second_mb:+.0f} MB",
        )
        ports = {"gRPC": server.port, "HTTP": http_port, "metrics": metrics_port}
        idle = {}
        for name, port in ports.items():
            idle[name] = await asyncio.to_thread(_idle_flood, pid, port, num_idle, idle_timeout_s)
        after = sample_process(pid, time.monotonic() - start)
    for name, (during, closed_s) in idle.items():
        result.check(
            f"{name}: no thread per connection",
            during.threads - before.threads < num_idle // 10,  # a thread each would add num_idle
            f"threads {before.threads} -> {during.threads}",
        )
        result.check(
            f"{name}: every silent connection closed by the server",
            closed_s is not None,
            f"still open {3 * idle_timeout_s + 10:g} s after opening",
        )
    result.figures = {
        "RSS": f"{before.rss_mb:.0f} MB, {after_watches.rss_mb:.0f} after a Watch flood ({rss_mb:+.0f}), "
        f"{after_second.rss_mb:.0f} after a second ({second_mb:+.0f}), {after.rss_mb:.0f} at the end",
        "threads / fds during each idle flood": ", ".join(
            f"{name} {during.threads} / {during.fds}" for name, (during, _) in idle.items()
        )
        + f" (before: {before.threads} / {before.fds}; after: {after.threads} / {after.fds})",
        "all closed by the server after": ", ".join(
            f"{name} {closed_s:.1f} s" if closed_s is not None else f"{name} never"
            for name, (_, closed_s) in idle.items()
        ),
    }
    return result


async def _watch_flood(target: str, count: int, name_bytes: int) -> list[str]:
    """`count` concurrent Watch calls, each naming a distinct service of `name_bytes`; how each ended."""
    options = [("grpc.max_send_message_length", name_bytes + 1024)]
    async with grpc.aio.insecure_channel(target, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def watch(index: int) -> str:
            name = f"{index:08d}".ljust(name_bytes, "x")
            call = stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=60)
            try:
                async for _ in call:
                    call.cancel()  # a status streamed: the server held the stream (what it must not)
                    return "STREAMED"
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return "OK"

        return await asyncio.gather(*(watch(i) for i in range(count)))


def _idle_flood(pid: int, port: int, count: int, idle_timeout_s: float) -> tuple[ProcessSample, float | None]:
    """`count` silent connections to `port`: the server's sample with them open, and how long after opening
    the server had closed them all (None: not within three idle timeouts and 10 s)."""
    opened = time.monotonic()
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    during = sample_process(pid, 0.0)
    deadline = opened + 3 * idle_timeout_s + 10
    try:
        for sock in sockets:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            except TimeoutError:
                return during, None
        return during, time.monotonic() - opened
    finally:
        for sock in sockets:
            sock.close()
