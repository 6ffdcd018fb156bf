"""A textgen server as a subprocess: start on a free port, wait for gRPC health SERVING, stop with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(target: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Poll the standard health service until it reports SERVING; fail early if `process` exits."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server exited with code {process.returncode} before it was ready")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet, or still loading
            time.sleep(0.5)
    raise TimeoutError(f"server at {target} was not SERVING within {timeout_s:.0f} s")


class ServerProcess:
    """`python -m service --port P *args`, as a context manager that waits for it to be ready.

    `port`: the one to listen on (a restarted replica keeps its address); default: a free one.
    `env`: variables added to this process's environment for the server's (e.g. `OMP_NUM_THREADS`).
    The server's output goes to `log_path`; the with-block's exit sends SIGTERM and waits for a clean drain.
    """

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        startup_timeout_s: float = 600.0,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.env = env or {}
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "service", "--port", str(self.port), *self.args]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        try:
            wait_serving(self.target, self.startup_timeout_s, self.process)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if the server has not exited within `grace_s`."""
        terminate(self.process, grace_s)


def terminate(process: subprocess.Popen | None, grace_s: float = 30.0) -> None:
    """SIGTERM `process`, then SIGKILL if it has not exited within `grace_s`; nothing if it has ended."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
