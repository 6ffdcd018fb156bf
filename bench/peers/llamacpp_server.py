"""llama.cpp's `llama-server` as a subprocess on loopback: start on a free port, wait for `/health`, stop.

The flags are the comparison's (the team's "Speed" issue): 32 parallel slots, 2 threads, 64k tokens of
context in all; the model is a local GGUF file, so nothing is downloaded.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Self

from bench.peers.llamacpp_client import LlamaCppClient, is_ready
from bench.server import free_port, terminate

SERVER_FLAGS = ("-np", "32", "-t", "2", "-c", "65536")


class LlamaServerProcess:
    """`llama-server -m <gguf> --host 127.0.0.1 --port P <flags>`, as a context manager that waits for it.

    The server's output goes to `log_path`; the with-block's exit sends SIGTERM.
    """

    def __init__(
        self,
        binary: Path,
        gguf: Path,
        log_path: Path,
        flags: tuple[str, ...] = SERVER_FLAGS,
        startup_timeout_s: float = 300.0,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.base_url = f"http://{self.host}:{self.port}"
        self.command = [str(binary), "-m", str(gguf), "--host", self.host, "--port", str(self.port), *flags]
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None

    def client(self) -> LlamaCppClient:
        return LlamaCppClient(self.host, self.port)

    def __enter__(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with code {self.process.returncode} before it was ready"
                    f" (log: {self.log_path})"
                )
            if is_ready(self.base_url):
                return
            time.sleep(0.5)
        raise TimeoutError(f"llama-server was not ready within {self.startup_timeout_s:.0f} s")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if the server has not exited within `grace_s`."""
        terminate(self.process, grace_s)
