"""SMG, the pinned gateway binary (`smg` wheel), in front of two tiny-model servers over SMG's vLLM worker
protocol (service/worker/servicer.py): the OpenAI SDK talks to the gateway, it to the replicas over gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc

from engine.core.kv_events import BlocksStored
from engine.core.observer import EngineObserver
from engine.errors import RequestCancelledError
from engine.frontend.engine import Engine
from engine.request import SamplingParams, StoppingParams
from telemetry.vllm_metrics import VllmMetrics
from tests.conftest import ServerThread

SMG = Path(sys.executable).parent / "smg"
START_TIMEOUT_S = 120.0
PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]


class FinishedRequests(EngineObserver):
    """Records how each request ended (None: finished normally), from the engine's loop thread."""

    def __init__(self) -> None:
        self.errors: list[Exception | None] = []

    def request_finished(self, seq, error: Exception | None) -> None:
        self.errors.append(error)


class Replica:
    """A server whose engine reports how its requests end."""

    def __init__(self, config) -> None:
        self.finished = FinishedRequests()
        self.thread = ServerThread(config).start(load=False)
        self.engine = Engine(config.engine, self.finished)
        self.engine.start()
        self.thread.run(self.thread.server.load(self.engine), timeout=300)

    @property
    def url(self) -> str:
        return f"grpc://{self.thread.target}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.thread.server.http.port}"


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = START_TIMEOUT_S):
    """Poll `condition` until it returns something true; that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def replicas(server_config):
    started = [Replica(dataclasses.replace(server_config(), http_port=0)) for _ in range(2)]
    yield started
    for replica in started:
        replica.thread.stop()


class Gateway:
    def __init__(self, worker_urls: list[str], log_path: Path, *extra_args: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = log_path
        command = [
            str(SMG), "launch", "--host", "127.0.0.1", "--port", str(self.port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.metrics_port),
            "--policy", "cache_aware", "--log-level", "info",
            "--worker-urls", *worker_urls, *extra_args,
        ]  # fmt: skip
        self._log = log_path.open("w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> httpx.Response | None:
        try:
            return httpx.get(self.base_url + path, timeout=5)
        except httpx.TransportError:
            assert self.process.poll() is None, f"smg exited: {self.log_path.read_text()[-2000:]}"
            return None

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def gateway(replicas, tmp_path_factory):
    model_name = replicas[0].engine.model_info.name
    gateway = Gateway([r.url for r in replicas], tmp_path_factory.mktemp("smg") / "smg.log")
    try:
        wait_for(lambda: _ready_workers(gateway) == len(replicas), "smg to register both workers")
        wait_for(lambda: _tokenizer_loaded(gateway, model_name), "smg to load the tokenizer (GetTokenizer)")
        yield gateway
    finally:
        gateway.stop()


def _ready_workers(gateway: Gateway) -> int:
    response = gateway.get("/workers")
    if response is None or response.status_code != 200:
        return 0
    body = response.json()
    workers = body.get("workers", body) if isinstance(body, dict) else body
    return sum(1 for w in workers if w.get("is_healthy", w.get("healthy", True)))


def _tokenizer_loaded(gateway: Gateway, model_name: str) -> bool:
    response = gateway.get("/v1/tokenizers")
    return response is not None and response.status_code == 200 and model_name in response.text


@pytest.fixture(scope="module")
def model(replicas) -> str:
    return replicas[0].engine.model_info.name


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)


def test_chat_completion_through_smg_is_the_replicas_own_output(client, model, replicas):
    # Seeded sampling: the tiny random model's greedy output is only newlines, which the gateway drops.
    response = client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=12, temperature=1.0, seed=7
    )
    engine = replicas[0].engine
    sampling, stopping = SamplingParams(temperature=1.0, seed=7), StoppingParams(max_new_tokens=12)
    expected = engine.generate([engine.apply_chat_template(PROMPT)], sampling, stopping)[0]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (
        expected.prompt_tokens,
        expected.completion_tokens,
    )
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].message.content


def test_streamed_chat_completion_through_smg_adds_up_to_the_unary_one(client, model):
    kwargs = dict(model=model, messages=PROMPT, max_tokens=12, temperature=1.0, seed=11)
    unary = client.chat.completions.create(**kwargs)
    deltas = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kwargs, stream=True)
        if c.choices
    ]
    assert len([d for d in deltas if d]) > 1
    assert "".join(deltas) == unary.choices[0].message.content


def test_client_disconnect_through_smg_cancels_the_request_and_frees_its_kv(
    client, model, replicas, wait_until_idle
):
    for replica in replicas:
        replica.finished.errors.clear()
    stream = client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=2000, temperature=0.8, stream=True
    )
    next(iter(stream))
    busy = wait_for(lambda: [r for r in replicas if r.engine.load.num_running], "the request to run")
    stream.close()  # the client goes away mid-generation
    replica = busy[0]
    wait_until_idle(replica.engine, timeout_s=60)
    assert any(isinstance(e, RequestCancelledError) for e in replica.finished.errors)


def test_kv_events_reach_smg_index(client, model, gateway, replicas):
    prompt = [{"role": "user", "content": "A long shared system prompt about colours. " * 8}]
    client.chat.completions.create(model=model, messages=prompt, max_tokens=2, temperature=0)

    def smg_counts() -> dict[str, tuple[float, float]] | None:
        """Per worker: the blocks SMG applied as stored, and those its index holds; once they add up."""
        metrics = gateway.metrics()
        counts = {
            r.url: (
                metrics.get(("smg_kv_event_blocks_total", (("op", "stored"), ("worker", r.url))), 0.0),
                metrics.get(("smg_kv_index_blocks", (("worker", r.url),)), 0.0),
            )
            for r in replicas
        }
        return counts if all(counts[r.url][0] == stored_blocks(r) for r in replicas) else None

    counts = wait_for(smg_counts, "smg to apply every block the replicas published")
    assert max(stored for stored, _ in counts.values()) > 0
    assert all(held > 0 for stored, held in counts.values() if stored)
    metrics = gateway.metrics()
    assert all(v == 0 for (name, _), v in metrics.items() if name == "smg_kv_events_unavailable")


def stored_blocks(replica: Replica) -> int:
    """The blocks `replica` has published as stored (nothing is evicted or cleared in these tests)."""
    batches = replica.engine.kv_events.since(0)
    return sum(len(e.block_hashes) for b in batches for e in b.events if isinstance(e, BlocksStored))


def test_get_loads_matches_the_replicas_own_gauges(client, model, replicas):
    stream = client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=2000, temperature=0.8, stream=True
    )
    next(iter(stream))
    try:
        running = wait_for(lambda: [r for r in replicas if r.engine.load.num_running], "a running request")
        replica = running[0]
        before = _gauges(replica.engine)
        loads = asyncio.run(_get_loads(replica.thread.target))
        after = _gauges(replica.engine)
    finally:
        stream.close()
    (load,) = loads.loads
    running = "vllm:num_requests_running"
    assert load.num_running_reqs == before[running] == after[running] == 1
    assert load.num_waiting_reqs == 0
    low, high = sorted((before["vllm:kv_cache_usage_perc"], after["vllm:kv_cache_usage_perc"]))
    assert low <= load.token_usage <= high
    assert load.token_usage > 0


def _gauges(engine: Engine) -> dict[str, float]:
    return {metric.name: metric.samples[0].value for metric in VllmMetrics(engine).collect()}


async def _get_loads(target: str) -> pb.GetLoadsResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        return await pb_grpc.VllmEngineStub(channel).GetLoads(pb.GetLoadsRequest())


def test_smg_identifies_an_http_worker_and_reads_its_load(replicas, tmp_path):
    """Over the OpenAI HTTP front SMG finds `/version`, registers a vLLM-compatible worker (no "Could not
    identify backend engine") and reads its load from the vLLM-named gauges of `/metrics`."""
    replica = replicas[0]
    gateway = Gateway([replica.http_url], tmp_path / "smg.log", "--load-monitor-interval", "1")
    try:
        wait_for(lambda: _ready_workers(gateway) == 1, "smg to register the HTTP worker")
        (worker,) = gateway.get("/workers").json()["workers"]
        usage = ("smg_engine_token_usage", (("dp_rank", "0"), ("model", replica.engine.model_info.name)))
        key = (usage[0], tuple(sorted((*usage[1], ("worker", replica.http_url)))))
        wait_for(lambda: key in gateway.metrics(), "smg to read the worker's load from /metrics")
        model, engine = replica.engine.model_info.name, replica.engine
        assert (worker["runtime_type"], worker["labels"]["max_model_len"]) == (
            "vllm",
            str(engine.max_context_len),
        )
        (load,) = gateway.get("/workers").json()["workers"][0]["engine_load"]["loads"]
        assert load["max_total_num_tokens"] == engine.load.num_kv_blocks * engine.model_info.kv_block_size
        client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=4, seed=1)
        assert response.usage.completion_tokens == 4
    finally:
        gateway.stop()
    log = gateway.log_path.read_text()
    assert "Could not identify backend engine" not in log


def test_cache_aware_routing_sends_a_repeated_prefix_to_the_replica_that_cached_it(client, model):
    """Each tenant's second request finds its system prompt's blocks cached (round-robin over two replicas
    would send it to the other one every time)."""
    for tenant in range(4):
        system = f"Tenant {tenant}'s system prompt: " + "colours, shapes and numbers. " * 12
        for question in ("first", "second"):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            response = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
        assert response.usage.prompt_tokens_details.cached_tokens >= 48  # the system prompt's full blocks


def test_smg_learns_a_restarted_replica_s_kv_events(server_config, tmp_path):
    """A replica restarted on its port numbers its KV events above the old process's: SMG's cursor from
    before the restart is refused OUT_OF_RANGE, SMG drops the old blocks, subscribes from 0 and indexes
    exactly what the new process cached."""
    config = dataclasses.replace(server_config(), port=free_port())
    first = ServerThread(config).start()
    url = f"grpc://{first.target}"
    gateway = Gateway([url], tmp_path / "smg.log")
    restarted = None
    try:
        model = first.engine.model_info.name
        wait_for(lambda: _ready_workers(gateway) == 1, "smg to register the worker")
        wait_for(lambda: _tokenizer_loaded(gateway, model), "smg to load the tokenizer")
        client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)
        before = [{"role": "user", "content": "Before the restart: " + "red, green and blue. " * 8}]
        client.chat.completions.create(model=model, messages=before, max_tokens=2)
        wait_for(lambda: _indexed_blocks(gateway, url) == stored_blocks(first), "smg to index the first one")
        first.stop()
        restarted = ServerThread(config).start()
        after = [{"role": "user", "content": "After the restart: " + "cyan, magenta and yellow. " * 12}]
        wait_for(lambda: _completes(client, model, after), "a request through smg to reach the new process")
        new_blocks = stored_blocks(restarted)
        assert new_blocks > 0
        wait_for(lambda: _indexed_blocks(gateway, url) == new_blocks, "smg to index the new process alone")
        resyncs = ("smg_kv_event_resyncs_total", (("reason", "out_of_range"), ("worker", url)))
        assert gateway.metrics().get(resyncs, 0.0) >= 1
    finally:
        gateway.stop()
        if restarted is not None:
            restarted.stop()
    assert "KV event replay cursor expired" in gateway.log_path.read_text()


def _indexed_blocks(gateway: Gateway, worker_url: str) -> float:
    return gateway.metrics().get(("smg_kv_index_blocks", (("worker", worker_url),)), -1.0)


def _completes(client: openai.OpenAI, model: str, messages: list[dict]) -> bool:
    try:
        return bool(client.chat.completions.create(model=model, messages=messages, max_tokens=2).usage)
    except openai.APIError:
        return False


def test_smg_starting_after_the_history_lost_the_start_indexes_a_snapshot_of_the_cache(
    server_config, tmp_path
):
    """A gateway that subscribes from 0 once the history no longer holds the first batch gets the index as
    it stands (one snapshot chunk), not just what is cached from then on."""
    replica = ServerThread(server_config()).start()
    gateway = None
    try:
        engine, log = replica.engine, replica.engine.kv_events
        log.max_batches = 1
        for first in (500, 600):
            prompt = list(range(first, first + 3 * engine.model_info.kv_block_size))
            engine.generate([prompt], stopping=StoppingParams(max_new_tokens=1, ignore_eos=True))
        assert log.since(0) is None
        cached = sum(len(e.block_hashes) for e in log.snapshot().events if isinstance(e, BlocksStored))
        url = f"grpc://{replica.target}"
        gateway = Gateway([url], tmp_path / "smg.log")
        wait_for(lambda: _ready_workers(gateway) == 1, "smg to register the worker")
        wait_for(lambda: _indexed_blocks(gateway, url) == cached, "smg to index the snapshot")
    finally:
        if gateway is not None:
            gateway.stop()
        replica.stop()
    assert "served a state snapshot" in gateway.log_path.read_text()
