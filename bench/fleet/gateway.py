"""`make bench-fleet`: three textgen replicas behind SMG on one machine, under a multi-tenant chat workload.

Each replica is `python -m service` serving both the gRPC port (SMG's vLLM worker protocol, KV events) and
the OpenAI HTTP front. For each KV budget (`room`: every tenant's system prompt fits on each replica;
`tight`: only a replica's share does) the replicas are started with that `--num-kv-blocks`, and the same
requests go through SMG once per routing setup, the prefix caches flushed (`FlushCache`) before each:

- `round_robin/http`: SMG's round robin over the HTTP fronts (what a plain load balancer does);
- `cache_aware/http`: SMG's cache-aware policy over the HTTP fronts (it guesses from the prompts it routed);
- `cache_aware/grpc`: SMG's cache-aware policy over the gRPC workers, fed by their KV events;
- `1 replica/grpc`: all of it to one replica, the hit ratio a fleet is measured against.

A run's row: the fleet's prefix-cache hit ratio (prompt tokens found over looked up, from the replicas'
`textgen_prefix_cache_*_total`), TTFT p50 / p99 and output tokens/s as the client saw them, and requests
finished per replica (`textgen_requests_total{outcome="ok"}`). Then, through `cache_aware/grpc`, one replica
is sent SIGTERM and started again under load: every request must complete.

A markdown table and JSON go to bench/results/; the command exits 1 when any step failed or did not run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from bench.fleet.chat_load import BackToBack, ChatClient, replay
from bench.fleet.replica_counters import ReplicaCounters, hit_ratio, scrape
from bench.fleet.replicas import Replica
from bench.fleet.smg import SmgGateway
from bench.fleet.tenants import TenantWorkloadConfig, kv_budgets, tenant_workload
from bench.metrics import RequestTrace, summarize
from bench.report import environment, fmt, load_note, markdown_table, to_json
from bench.server import free_port

RESULTS_DIR = Path(__file__).parents[1] / "results"
RUNS = {  # name -> (SMG policy, worker transport, workers: 0 = every replica)
    "round_robin/http": ("round_robin", "http", 0),
    "cache_aware/http": ("cache_aware", "http", 0),
    "cache_aware/grpc": ("cache_aware", "grpc", 0),
    "1 replica/grpc": ("round_robin", "grpc", 1),
}
RESTART = "restart under load"
# SMG probes a worker's health every 60 s by default: a restarted replica would wait that long for traffic.
SMG_ARGS = ("--health-check-interval-secs", "1")


@dataclass(slots=True)
class StepResult:
    """One step of the benchmark: a run of the workload, or the restart; `error` empty when it passed."""

    name: str
    error: str = ""
    row: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error


class Fleet:
    """`num_replicas` replicas, each with a gRPC port, an HTTP port and a metrics port."""

    def __init__(
        self, server_args: list[str], num_replicas: int, log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.http_ports = [free_port() for _ in range(num_replicas)]
        self.replicas = [
            Replica(i, [*server_args, "--http-port", str(port)], log_dir, env)
            for i, port in enumerate(self.http_ports)
        ]

    def urls(self, transport: str, num_workers: int = 0) -> list[str]:
        urls = [
            f"grpc://{r.address}" if transport == "grpc" else f"http://127.0.0.1:{port}"
            for r, port in zip(self.replicas, self.http_ports, strict=True)
        ]
        return urls[: num_workers or len(urls)]

    def start(self) -> None:
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(Replica.start, self.replicas))

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()

    def counters(self) -> list[ReplicaCounters]:
        return [scrape(replica.metrics_port) for replica in self.replicas]

    def model_name(self) -> str:
        """The served model's name, as SMG and its clients call it (`/v1/models`)."""
        models = httpx.get(f"http://127.0.0.1:{self.http_ports[0]}/v1/models", timeout=10).json()
        return models["data"][0]["id"]

    async def flush_caches(self) -> None:
        """Drop every replica's prefix cache, so that each run starts cold."""
        for replica in self.replicas:
            async with grpc.aio.insecure_channel(replica.address) as channel:
                response = await pb_grpc.VllmEngineStub(channel).FlushCache(
                    common_pb2.FlushCacheRequest(), timeout=30
                )
            assert response.success, f"FlushCache on replica {replica.index}: {response.message}"


async def until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll `condition` (in a thread: it may scrape a replica) until it is true; TimeoutError after
    `timeout_s`, naming `what` was awaited."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(0.2)


def served_since_start(replica: Replica) -> str:
    """The requests `replica`'s current process finished OK; `?` when its endpoint does not answer."""
    try:
        return str(round(scrape(replica.metrics_port).requests_ok))
    except OSError:
        return "?"


def run_row(
    traces: Sequence[RequestTrace], duration_s: float, counters: list[ReplicaCounters] | None
) -> dict[str, object]:
    """A table row from a step's traces and (for a run) each replica's counters over it."""
    summary = summarize(traces, duration_s)
    return {
        "requests ok": f"{summary.num_ok}/{summary.num_requests}",
        "hit ratio": fmt(hit_ratio(counters), 3) if counters else "-",
        "TTFT p50 s": fmt(summary.ttft_s["p50"], 3),
        "TTFT p99 s": fmt(summary.ttft_s["p99"], 3),
        "output tok/s": fmt(summary.output_throughput, 1),
        "requests per replica": "/".join(str(round(c.requests_ok)) for c in counters) if counters else "-",
    }


def first_errors(traces: Sequence[RequestTrace]) -> str:
    """How many requests failed and the first distinct errors; empty when none did."""
    errors = [t.error for t in traces if not t.ok]
    if not errors:
        return ""
    return f"{len(errors)} of {len(traces)} requests failed: " + "; ".join(dict.fromkeys(errors[:20]))


@dataclass(slots=True, frozen=True)
class RestartPlan:
    """The restart step: through which of `RUNS`, how many requests in flight, how many to see finish
    before the SIGTERM and again after the restart, the replicas' drain grace period, the longest wait."""

    run: str = "cache_aware/grpc"
    concurrency: int = 4
    min_requests: int = 8
    grace_period_s: float = 30.0
    timeout_s: float = 300.0


@dataclass(slots=True)
class Bench:
    """What every step shares: the replicas, the workload, the client's settings and where logs go."""

    fleet: Fleet
    model: str
    workload: TenantWorkloadConfig
    log_dir: Path
    temperature: float = 0.0
    timeout_s: float = 600.0
    traces: dict[str, list] = field(default_factory=dict)  # step name -> its traces as dicts, for the JSON

    def client(self, base_url: str) -> ChatClient:
        return ChatClient(base_url, self.model, self.temperature, self.timeout_s)

    def gateway(self, step: str, policy: str, urls: list[str]) -> SmgGateway:
        slug = "".join(c if c.isalnum() else "-" for c in step)
        return SmgGateway(policy, urls, self.log_dir / f"smg-{slug}.log", SMG_ARGS)

    async def settled_counters(self, before: list[ReplicaCounters], num_ok: int) -> list[ReplicaCounters]:
        """Each replica's counters since `before`, once they count every request that finished OK (a
        replica counts a request just after its last chunk went out)."""
        deltas: list[ReplicaCounters] = []

        def counted() -> bool:
            deltas[:] = [a - b for a, b in zip(self.fleet.counters(), before, strict=True)]
            return sum(d.requests_ok for d in deltas) >= num_ok

        await until(counted, 30, "the replicas' request counters to add up to the requests that finished")
        return deltas

    async def run(self, step: str, name: str) -> StepResult:
        """The workload through SMG as `RUNS[name]` says, every prefix cache cold."""
        policy, transport, num_workers = RUNS[name]
        await self.fleet.flush_caches()
        before = await asyncio.to_thread(self.fleet.counters)
        with self.gateway(step, policy, self.fleet.urls(transport, num_workers)) as smg:
            await asyncio.to_thread(smg.wait_ready, self.model)
            async with self.client(smg.base_url) as client:
                traces, duration = await replay(client, tenant_workload(self.workload))
            routing = await asyncio.to_thread(smg.routing)
            kv_events = await asyncio.to_thread(smg.kv_events_unavailable) if transport == "grpc" else "-"
        counters = await self.settled_counters(before, sum(t.ok for t in traces))
        self.traces[step] = [asdict(t) for t in traces]
        row = run_row(traces, duration, counters)
        row["smg routing"], row["smg kv events"] = routing, kv_events
        return StepResult(step, first_errors(traces), row)

    async def restart(self, step: str, plan: RestartPlan) -> StepResult:
        """Load through SMG as `RUNS[plan.run]` says; SIGTERM one replica, wait for its exit, start it again;
        stop once SMG lists it healthy again and `plan.min_requests` more requests have finished. Whether
        it then gets requests is the policy's business (cache-aware routing keeps a tenant where its prefix
        is cached), so the row reports how many it served rather than requiring some."""
        policy, transport, _ = RUNS[plan.run]
        stopped = self.fleet.replicas[1 % len(self.fleet.replicas)]
        stopped_url = self.fleet.urls(transport)[stopped.index]
        exit_code, error = None, ""
        with self.gateway(step, policy, self.fleet.urls(transport)) as smg:
            await asyncio.to_thread(smg.wait_ready, self.model)
            async with self.client(smg.base_url) as client:
                load = BackToBack(client, tenant_workload(self.workload), plan.concurrency)
                try:
                    await until(lambda: load.num_done >= plan.min_requests, plan.timeout_s, "steady load")
                    stopped.sigterm()
                    exit_code = await asyncio.to_thread(stopped.wait_exit, plan.grace_period_s + 30)
                    await asyncio.to_thread(stopped.start)
                    restarted_at = load.num_done
                    await until(
                        lambda: (
                            load.num_done >= restarted_at + plan.min_requests
                            and stopped_url in smg.healthy_workers()
                        ),
                        plan.timeout_s,
                        f"smg to list replica {stopped.index} healthy again",
                    )
                except TimeoutError as timeout:
                    error = str(timeout)
                finally:
                    traces, duration = await load.stop()
            kv_events = await asyncio.to_thread(smg.kv_events_unavailable)
        self.traces[step] = [asdict(t) for t in traces]
        row = run_row(traces, duration, None)
        row["requests per replica"] = f"{served_since_start(stopped)} by replica {stopped.index} once back"
        row["smg kv events"] = kv_events
        exited = f"replica {stopped.index} exited with {exit_code}" if exit_code else ""
        return StepResult(step, "; ".join(e for e in (first_errors(traces), error, exited) if e), row)


def planned_steps(budgets: Sequence[str], runs: Sequence[str], restart: bool) -> list[str]:
    """Every step's name, in order: each run under each KV budget, then the restart (under the last)."""
    return [f"{budget} · {run}" for budget in budgets for run in runs] + ([RESTART] if restart else [])


def gate(planned: Sequence[str], results: Sequence[StepResult]) -> list[str]:
    """What makes the benchmark fail: each step that failed, and each planned step that did not run."""
    ran = {result.name for result in results}
    problems = [f"{result.name}: {result.error}" for result in results if not result.ok]
    return problems + [f"{name}: did not run" for name in planned if name not in ran]


def results_table(results: Sequence[StepResult]) -> str:
    columns = ["requests ok", "hit ratio", "TTFT p50 s", "TTFT p99 s", "output tok/s", "requests per replica",
               "smg routing"]  # fmt: skip
    rows = [[r.name, *(str(r.row.get(c, "-")) for c in columns), "ok" if r.ok else "FAILED"] for r in results]
    return markdown_table(["step", *columns, "result"], rows)


async def step(name: str, work: Awaitable[StepResult]) -> StepResult:
    """`work` (a coroutine giving a StepResult); an exception makes a failed step, not the end of the run."""
    try:
        return await work
    except Exception as error:  # noqa: BLE001 - any failure of one step is reported, and the gate fails
        return StepResult(name, f"{type(error).__name__}: {error}")


Saver = Callable[[list[StepResult], dict[str, list]], object]


async def bench_fleet(
    args: argparse.Namespace, server_args: list[str], log_dir: Path, save: Saver
) -> tuple[list[StepResult], dict[str, list]]:
    """Every step of `args` (see the module's docstring); the results, and each step's traces. `save` gets
    them after every step, so that an interrupted run keeps what it measured."""
    workload = workload_config(args)
    budgets = kv_budgets(workload, args.kv_block_size, args.replicas, args.kv_in_flight)
    results: list[StepResult] = []
    traces: dict[str, list] = {}

    async def record(result: Awaitable[StepResult]) -> None:
        results.append(await result)
        save(results, traces)

    for budget in args.kv_budgets:
        flags = [
            *server_args,
            "--num-kv-blocks",
            str(budgets[budget]),
            "--kv-block-size",
            str(args.kv_block_size),
        ]
        fleet = Fleet(flags, args.replicas, log_dir / budget, replica_env(args))
        try:
            await asyncio.to_thread(fleet.start)
            model = await asyncio.to_thread(fleet.model_name)
            bench = Bench(fleet, model, workload, log_dir / budget, args.temperature, traces=traces)
            for run in args.runs:
                await record(step(f"{budget} · {run}", bench.run(f"{budget} · {run}", run)))
            if budget == args.kv_budgets[-1] and not args.no_restart:
                await record(step(RESTART, bench.restart(RESTART, restart_plan(args))))
        except Exception as error:  # noqa: BLE001 - the replicas did not start: this budget's steps did not run
            results.append(StepResult(f"{budget}: replicas", f"{type(error).__name__}: {error}"))
            save(results, traces)
        finally:
            await asyncio.to_thread(fleet.stop)
    return results, traces


def workload_config(args: argparse.Namespace) -> TenantWorkloadConfig:
    return TenantWorkloadConfig(
        num_tenants=args.tenants,
        system_len=args.system_len,
        question_len=args.question_len,
        output_len=args.output_len,
        num_requests=args.num_requests,
        request_rate=args.request_rate,
        seed=args.seed,
    )


def threads_per_replica(args: argparse.Namespace) -> int | None:
    """`--threads-per-replica`, else 1 when the replicas outnumber the cores (each replica's own OpenMP
    team of every core would fight the others' for them), else None: each replica takes the default."""
    if args.threads_per_replica is not None:
        return args.threads_per_replica
    return 1 if args.replicas > len(os.sched_getaffinity(0)) else None


def replica_env(args: argparse.Namespace) -> dict[str, str]:
    """The replicas' thread count as OpenMP reads it when its runtime loads: torch's and the C kernels'
    teams both take it (a setting made after the server imports torch would miss the kernels' team)."""
    threads = threads_per_replica(args)
    return {} if threads is None else {"OMP_NUM_THREADS": str(threads)}


def describe(args: argparse.Namespace) -> str:
    """The workload and the fleet in one line, above the table."""
    return (
        f"{args.replicas} replicas ({args.model or ('tiny random' if args.tiny_random else 'SmolLM2')},"
        f" {args.device}) behind smg; {args.tenants} tenants' {args.system_len}-word system prompts,"
        f" {args.num_requests} requests at {args.request_rate:g} req/s, each its own {args.question_len}-word"
        f" question and {args.output_len} output tokens; restart through {args.restart_run};"
        f" {threads_per_replica(args) or 'default'} thread(s) per replica"
    )


def restart_plan(args: argparse.Namespace) -> RestartPlan:
    return RestartPlan(
        args.restart_run,
        args.restart_concurrency,
        args.restart_min_requests,
        args.grace_period_s,
        args.restart_timeout_s,
    )


def tiny_random_model(path: Path) -> Path:
    """A tiny random-weight Llama with the default model's tokenizer (its chat template for SMG) in `path`."""
    import torch
    import transformers

    from engine.execution.loader import default_model_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet.gateway",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="a local model directory (default: SmolLM2)")
    model.add_argument("--tiny-random", action="store_true", help="a tiny random-weight model (a smoke run)")
    parser.add_argument("--device", default="cpu", help="every replica's --device")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--tenants", type=int, default=16, help="system prompts")
    parser.add_argument("--system-len", type=int, default=500, help="words of each system prompt")
    parser.add_argument("--question-len", type=int, default=24, help="words of each user's question")
    parser.add_argument("--output-len", type=int, default=32, help="tokens each request generates")
    parser.add_argument("--num-requests", type=int, default=96, help="requests per run")
    parser.add_argument("--request-rate", type=float, default=2.0, help="Poisson req/s; inf = all at once")
    parser.add_argument("--seed", type=int, default=0, help="prompts, tenants and arrivals")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (seeded)")
    parser.add_argument("--kv-block-size", type=int, default=16)
    parser.add_argument("--kv-in-flight", type=int, default=4,
                        help="requests a KV budget has room for beside the cached prefixes")  # fmt: skip
    parser.add_argument("--kv-budgets", type=lambda s: s.split(","), default=["room", "tight"],
                        help="comma-separated among room, tight")  # fmt: skip
    parser.add_argument("--runs", type=lambda s: s.split(","), default=list(RUNS),
                        help=f"comma-separated among {', '.join(RUNS)}")  # fmt: skip
    parser.add_argument("--no-restart", action="store_true", help="skip the restart under load")
    parser.add_argument("--restart-run", choices=list(RUNS), default=RestartPlan().run,
                        help="the routing setup the restart goes through")  # fmt: skip
    parser.add_argument("--restart-timeout-s", type=float, default=RestartPlan().timeout_s,
                        help="the longest the restart waits for each of its phases")  # fmt: skip
    parser.add_argument(
        "--restart-concurrency", type=int, default=4, help="requests in flight while restarting"
    )
    parser.add_argument("--restart-min-requests", type=int, default=8,
                        help="requests finished before the SIGTERM, and again after the restart")  # fmt: skip
    parser.add_argument(
        "--grace-period-s", type=float, default=30.0, help="every replica's drain grace period"
    )
    parser.add_argument(
        "--server-arg", action="append", default=[], metavar="FLAG", help="extra replica flag"
    )
    parser.add_argument("--threads-per-replica", type=int, metavar="N",
                        help="each replica's OMP_NUM_THREADS (default: 1 when replicas > cores)")  # fmt: skip
    parser.add_argument(
        "--output-dir", type=Path, default=RESULTS_DIR, help="where the JSON, table and logs go"
    )
    return parser


class ResultFiles:
    """The run's markdown report and JSON in the output folder, rewritten by `save` after every step."""

    def __init__(self, args: argparse.Namespace, argv: list[str], stamp: str) -> None:
        self._args = args
        self._argv = argv
        self._load_before = os.getloadavg()[0]
        self.json_path = args.output_dir / f"fleet-{stamp}.json"
        self.report = ""
        self.problems: list[str] = []

    def save(self, results: list[StepResult], traces: dict[str, list]) -> None:
        """Write what the steps so far gave: the steps not yet run count as not run."""
        args = self._args
        self.problems = gate(planned_steps(args.kv_budgets, args.runs, not args.no_restart), results)
        env = environment(self._load_before)
        self.report = f"{describe(args)}\n\n{results_table(results)}\n\n{load_note(env)}\n"
        record = {
            "environment": env,
            "workload": asdict(workload_config(args)),
            "args": self._argv,
            "steps": [asdict(r) for r in results],
            "failures": self.problems,
            "traces": traces,
        }
        args.output_dir.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(to_json(record))
        self.json_path.with_suffix(".md").write_text(self.report)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [name for name in args.runs if name not in RUNS] + [
        b for b in args.kv_budgets if b not in ("room", "tight")
    ]
    if unknown:
        build_parser().error(f"unknown runs or KV budgets: {', '.join(unknown)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    files = ResultFiles(args, sys.argv[1:] if argv is None else list(argv), stamp)
    log_dir = args.output_dir / f"fleet-{stamp}-logs"
    model = tiny_random_model(log_dir / "tiny-random") if args.tiny_random else args.model
    server_args = ["--device", args.device, "--host", "127.0.0.1",
                   "--grace-period-s", str(args.grace_period_s),
                   *(["--model", str(model)] if model else []), *args.server_arg]  # fmt: skip
    results, traces = asyncio.run(bench_fleet(args, server_args, log_dir, files.save))
    files.save(results, traces)
    print(f"\n{files.report}\nresults: {files.json_path}")
    for problem in files.problems:
        print(f"FAILED {problem}", file=sys.stderr)
    return 1 if files.problems else 0


if __name__ == "__main__":
    sys.exit(main())
