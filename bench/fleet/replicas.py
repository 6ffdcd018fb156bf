"""Replicas that lose nothing: `python -m service` processes on loopback ports behind one client channel.

Steady load goes over one `ipv4:127.0.0.1:P1,127.0.0.1:P2,...` channel with `replica_options()`
(round_robin over the replicas whose health says SERVING) and the Python client's retry policy. One
replica is sent SIGTERM; once it has exited it is started again on the same port. Every call's outcome
and time to first token are kept with the phase it started in: `steady`, `draining` (SIGTERM to exit),
`down` (exit to the new process's launch) and `back` (from the launch: loading, then SERVING). Requests
per replica come from each one's Prometheus endpoint (`textgen_requests_total{outcome="ok"}`), scraped
all along, since a drained process takes its counters with it. `make bench-replicas` runs it on the
default model; tests/test_replicas.py on a tiny one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.server import ServerProcess, free_port
from client import AsyncTextGenClient, RetryPolicy, replica_options

log = logging.getLogger(__name__)

PHASES = ("steady", "draining", "down", "back")
# A replica that comes back is reconnected within this long (gRPC's default backoff reaches 120 s).
MAX_RECONNECT_BACKOFF_MS = 1000
SCRAPE_EVERY_S = 0.2
NODE_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
PHASE_TIMEOUT_S = 120.0  # the longest a phase waits for its `min_served`


@dataclass(slots=True)
class CallRecord:
    """One streamed request: when it started (wall clock), its status, tokens, time to first token, and
    the phase it started in (filled in at the end)."""

    client: str  # python or node
    start_s: float
    code: str
    tokens: int
    ttft_s: float | None
    phase: str = ""


class PythonLoad:
    """`concurrency` streams in flight at all times through one `AsyncTextGenClient` channel with
    `replica_options()` and the client's retry policy (at most 4 attempts)."""

    def __init__(self, concurrency: int, max_new_tokens: int) -> None:
        self._concurrency = concurrency
        self._max_new_tokens = max_new_tokens
        self._done = asyncio.Event()
        self._calls: list[CallRecord] = []
        self._tasks: list[asyncio.Task] = []
        self._client: AsyncTextGenClient | None = None

    async def start(self, target: str) -> None:
        options = [*replica_options(), ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]
        self._client = AsyncTextGenClient(target, timeout=60, retry=RetryPolicy(), options=options)
        self._tasks = [asyncio.ensure_future(self._caller()) for _ in range(self._concurrency)]

    async def stop(self) -> list[CallRecord]:
        """Start no more calls, wait for those in flight; every call's record."""
        self._done.set()
        await asyncio.gather(*self._tasks)
        if self._client is not None:
            await self._client.close()
        return self._calls

    async def _caller(self) -> None:
        while not self._done.is_set():
            self._calls.append(await self._one_call())

    async def _one_call(self) -> CallRecord:
        start, wall = time.monotonic(), time.time()
        ttft, tokens = None, 0
        stream = self._client.stream("Once upon a time", max_new_tokens=self._max_new_tokens, ignore_eos=True)
        try:
            async for chunk in stream:
                if ttft is None:
                    ttft = time.monotonic() - start
                tokens += len(chunk.tokens)
        except grpc.aio.AioRpcError as error:
            return CallRecord("python", wall, error.code().name, tokens, ttft)
        return CallRecord("python", wall, "OK", tokens, ttft)


class NodeLoad:
    """The same load from Node.js: examples/node/replica_load.js, grpc-js's own round robin and retries."""

    def __init__(self, concurrency: int, max_new_tokens: int) -> None:
        self._args = ["--concurrency", str(concurrency), "--max-new-tokens", str(max_new_tokens)]
        self._process: asyncio.subprocess.Process | None = None
        self._first = b""  # the first call's record, read by `start`

    async def start(self, target: str) -> None:
        """Start the script; return once its first call has ended, so that a phase timed from here sees
        Node's calls (starting node and connecting takes longer than a short phase)."""
        self._process = await asyncio.create_subprocess_exec(
            "node", "replica_load.js", "--target", target, *self._args,
            cwd=NODE_EXAMPLE, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._first = await self._process.stdout.readline()

    async def stop(self) -> list[CallRecord]:
        """Close the script's standard input: it starts no more calls, ends those in flight and exits."""
        self._process.stdin.close()
        output, _ = await self._process.communicate()
        records = [json.loads(line) for line in (self._first + output).decode().splitlines() if line.strip()]
        return [
            CallRecord(
                "node",
                r["start_ms"] / 1000,
                r["code"],
                r["tokens"],
                None if r["ttft_ms"] is None else r["ttft_ms"] / 1000,
            )
            for r in records
        ]


Load = PythonLoad | NodeLoad
LOADS = {"python": PythonLoad, "node": NodeLoad}


class Replica:
    """One `python -m service` on a fixed port; `stop()` drains it, `start()` starts it again.

    `served()` is the requests it finished OK, summed over its processes (each one's last scrape).
    """

    def __init__(self, index: int, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.index = index
        self.env = env
        self.port = free_port()
        self.metrics_port = free_port()
        self._args = [*args, "--metrics-port", str(self.metrics_port)]
        self._log_dir = log_dir
        self._processes: list[ServerProcess] = []
        self._served: list[float] = []  # the last scrape of each process
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def process(self) -> ServerProcess:
        return self._processes[-1]

    def start(self) -> None:
        """Start a process and wait until it is SERVING."""
        log = self._log_dir / f"replica-{self.index}-{len(self._processes)}.log"
        server = ServerProcess(self._args, log, port=self.port, env=self.env)
        with self._lock:
            self._processes.append(server)
            self._served.append(0.0)
        server.__enter__()

    def sigterm(self) -> None:
        self.process.process.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float) -> int:
        return self.process.process.wait(timeout_s)

    def stop(self) -> None:
        self.process.stop()

    def scrape(self) -> None:
        """Read the current process's count of finished requests, if its endpoint answers."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                text = response.read().decode()
        except OSError:
            return  # starting, or gone
        ok = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "textgen_requests_total" and sample.labels.get("outcome") == "ok"
        )
        with self._lock:
            self._served[-1] = ok

    def served(self) -> int:
        with self._lock:
            return int(sum(self._served))


@dataclass(slots=True)
class ReplicaChange:
    """What one run saw: every call, and requests per replica in each phase."""

    calls: list[CallRecord] = field(default_factory=list)
    served: dict[str, list[int]] = field(default_factory=dict)  # phase -> requests finished per replica
    stopped: int = 0  # the index of the replica that was stopped and started again
    exit_code: int | None = None

    def assign_phases(self, starts: list[tuple[str, float]]) -> None:
        """Give each call the phase it started in, from each phase's start (wall clock)."""
        for call in self.calls:
            call.phase = next((name for name, at in reversed(starts) if at <= call.start_s), starts[0][0])

    def in_phase(self, phase: str) -> list[CallRecord]:
        return [call for call in self.calls if call.phase == phase]

    def of_client(self, client: str) -> list[CallRecord]:
        return [call for call in self.calls if call.client == client]

    def summary(self) -> dict[str, dict[str, object]]:
        """Per phase: requests finished per replica, and per client the calls by status and the p99 TTFT."""
        rows: dict[str, dict[str, object]] = {}
        for phase in PHASES:
            row: dict[str, object] = {"served_per_replica": self.served.get(phase, [])}
            for client in sorted({call.client for call in self.calls}):
                calls = [call for call in self.in_phase(phase) if call.client == client]
                ttfts = [call.ttft_s for call in calls if call.ttft_s is not None]
                row[client] = {
                    "calls": dict(Counter(call.code for call in calls)),
                    "p99_ttft_s": round(float(np.percentile(ttfts, 99)), 3) if ttfts else None,
                }
            rows[phase] = row
        return rows


async def replica_change(
    model_args: list[str],
    log_dir: Path,
    loads: Sequence[Load],
    num_replicas: int = 3,
    steady_s: float = 3.0,
    down_s: float = 2.0,
    back_s: float = 4.0,
    grace_period_s: float = 30.0,
    min_served: int = 0,
) -> ReplicaChange:
    """Start `num_replicas`, load them, SIGTERM replica 1, start it again; see the module's docstring.

    A phase lasts its `*_s`, and then until the replicas it is about each served `min_served` requests in
    it (every one while steady, the others while one is down, the restarted one once back), so that a
    slow machine still shows each step. `loads` (`PythonLoad`, `NodeLoad`) run all at once.
    """
    args = [*model_args, "--host", "127.0.0.1", "--grace-period-s", str(grace_period_s)]
    replicas = [Replica(i, args, log_dir) for i in range(num_replicas)]
    result = ReplicaChange(stopped=1 % num_replicas)
    stopped = replicas[result.stopped]
    with ThreadPoolExecutor(num_replicas) as pool:
        list(pool.map(Replica.start, replicas))
    target = "ipv4:" + ",".join(replica.address for replica in replicas)
    marks: list[list[int]] = []  # requests served per replica at each phase's start, and at the end
    starts: list[tuple[str, float]] = []  # each phase's name and start (wall clock)
    done = asyncio.Event()

    async def scraper() -> None:
        while not done.is_set():
            await asyncio.to_thread(lambda: [replica.scrape() for replica in replicas])
            await asyncio.sleep(SCRAPE_EVERY_S)

    async def next_phase(name: str) -> None:
        await asyncio.to_thread(lambda: [replica.scrape() for replica in replicas])
        marks.append([replica.served() for replica in replicas])
        starts.append((name, time.time()))
        log.info("%s: served per replica %s", name or "end", marks[-1])

    def served_since(index: int) -> int:
        return replicas[index].served() - marks[-1][index]

    async def until(min_s: float, *indices: int) -> None:
        """At least `min_s`, then until each replica of `indices` served `min_served` more."""
        await asyncio.sleep(min_s)
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while any(served_since(i) < min_served for i in indices) and time.monotonic() < deadline:
            await asyncio.sleep(SCRAPE_EVERY_S)

    others = [i for i in range(num_replicas) if i != result.stopped]
    scraping = asyncio.ensure_future(scraper())
    try:
        await next_phase("steady")
        for load in loads:
            await load.start(target)
        await until(steady_s, *range(num_replicas))
        await next_phase("draining")
        stopped.sigterm()
        result.exit_code = await asyncio.to_thread(stopped.wait_exit, grace_period_s + 30)
        await next_phase("down")
        await until(down_s, *others)
        await next_phase("back")
        await asyncio.to_thread(stopped.start)
        await until(back_s, result.stopped)
        for load in loads:
            result.calls += await load.stop()
        await next_phase("")
    finally:
        done.set()
        await scraping
        for replica in replicas:
            replica.stop()
    result.assign_phases(starts)
    for name, before, after in zip(PHASES, marks[:-1], marks[1:], strict=True):
        result.served[name] = [a - b for a, b in zip(after, before, strict=True)]
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """`make bench-replicas`: the default model (or `--model`), one run, a JSON summary on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet.replicas", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", help="a local model directory (default: SmolLM2)")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=6, help="streams in flight at all times")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--steady-s", type=float, default=10.0)
    parser.add_argument("--down-s", type=float, default=5.0)
    parser.add_argument("--back-s", type=float, default=10.0)
    parser.add_argument("--clients", nargs="+", choices=list(LOADS), default=["python"],
                        help="the load's clients, each with --concurrency streams")  # fmt: skip
    parser.add_argument("--log-dir", type=Path, default=Path("bench/results/replicas"))
    args = parser.parse_args(argv)
    model_args = ["--device", "cpu"] + (["--model", args.model] if args.model else [])
    result = asyncio.run(
        replica_change(
            model_args,
            args.log_dir,
            num_replicas=args.replicas,
            steady_s=args.steady_s,
            down_s=args.down_s,
            back_s=args.back_s,
            loads=[LOADS[client](args.concurrency, args.max_new_tokens) for client in args.clients],
        )
    )
    summary = {"stopped_replica": result.stopped, "exit_code": result.exit_code, "phases": result.summary()}
    print(json.dumps(summary, indent=2))
    (args.log_dir / "summary.json").write_text(
        json.dumps({**summary, "calls": [asdict(c) for c in result.calls]})
    )


if __name__ == "__main__":
    main()
