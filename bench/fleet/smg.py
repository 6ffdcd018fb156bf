"""SMG (the pinned `smg` wheel's gateway binary) as a subprocess in front of given workers.

`wait_ready` returns once SMG lists every worker healthy and, for gRPC workers, has loaded the tokenizer
(`GetTokenizer`), so that the first measured request is not refused; `stop` sends SIGTERM.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.server import free_port, terminate


def smg_binary() -> Path | None:
    """The `smg` beside this Python (the venv's), else on PATH; None when it is not installed."""
    beside = Path(sys.executable).parent / "smg"
    if beside.exists():
        return beside
    found = shutil.which("smg")
    return Path(found) if found else None


class SmgGateway:
    """`smg launch --policy POLICY --worker-urls ...` on a free loopback port, its log in `log_path`."""

    def __init__(
        self, policy: str, worker_urls: list[str], log_path: Path, extra_args: tuple[str, ...] = ()
    ) -> None:
        binary = smg_binary()
        assert binary is not None, "smg is not installed (pip install smg, pinned in requirements.txt)"
        self.worker_urls = worker_urls
        self.log_path = log_path
        self.port, self.metrics_port = free_port(), free_port()
        self.command = [
            str(binary), "launch", "--host", "127.0.0.1", "--port", str(self.port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.metrics_port),
            "--policy", policy, "--log-level", "warn", "--worker-urls", *worker_urls, *extra_args,
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc_info: object) -> None:
        terminate(self.process, grace_s=10)

    def healthy_workers(self) -> set[str]:
        """The URLs of the workers SMG lists as healthy (none while it starts)."""
        try:
            response = httpx.get(self.base_url + "/workers", timeout=5)
        except httpx.TransportError:
            return set()
        if response.status_code != 200:
            return set()
        body = response.json()
        workers = body.get("workers", []) if isinstance(body, dict) else body
        return {w["url"] for w in workers if w.get("is_healthy", True)}

    def wait_ready(self, model: str, timeout_s: float = 120.0) -> None:
        """Until every worker is healthy and (gRPC workers) SMG has the model's tokenizer."""
        grpc_workers = any(url.startswith("grpc://") for url in self.worker_urls)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, (
                f"smg exited: {self.log_path.read_text()[-2000:]}"
            )
            if self.healthy_workers() >= set(self.worker_urls) and (
                not grpc_workers or self._has_tokenizer(model)
            ):
                return
            time.sleep(0.2)
        raise TimeoutError(f"smg did not register {self.worker_urls} within {timeout_s:.0f} s")

    def kv_events_unavailable(self) -> str:
        """SMG's `smg_kv_events_unavailable` per worker (1: it has no KV events from that worker), as text
        for an error message; what went wrong when the metrics endpoint does not answer."""
        return self._described(
            lambda samples: (
                "smg_kv_events_unavailable: "
                + (
                    ", ".join(
                        f"{sample.labels.get('worker', '?')}={sample.value:g}"
                        for sample in samples
                        if sample.name == "smg_kv_events_unavailable"
                    )
                    or "none reported"
                )
            )
        )

    def routing(self) -> str:
        """How SMG's cache-aware policy placed the requests, by branch (`smg_cache_aware_policy_branch_total`:
        `event_hit` / `event_miss` on its KV-event index, `tree_match`, `spill`, `expected_wait_fallback` on
        its own prompt tree), and the requests sent past an overloaded worker; "-" for other policies."""

        def counts(samples: list) -> str:
            found = [
                f"{sample.labels.get('branch', '?')} {sample.value:g}"
                for sample in samples
                if sample.name == "smg_cache_aware_policy_branch_total" and sample.value
            ] + [
                f"overload fallback {sample.value:g}"
                for sample in samples
                if sample.name == "smg_worker_overload_fallback_total" and sample.value
            ]
            return ", ".join(found) or "-"

        return self._described(counts)

    def _described(self, describe: Callable[[list], str]) -> str:
        """`describe` of SMG's metric samples, or why its metrics endpoint did not answer."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        except httpx.TransportError as error:
            return f"smg's metrics did not answer: {error}"
        return describe(
            [sample for family in text_string_to_metric_families(text) for sample in family.samples]
        )

    def _has_tokenizer(self, model: str) -> bool:
        try:
            response = httpx.get(self.base_url + "/v1/tokenizers", timeout=5)
        except httpx.TransportError:
            return False
        return response.status_code == 200 and model in response.text
