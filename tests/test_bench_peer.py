"""Tests for the llama.cpp comparison's parts that need no llama.cpp build: the request it gets, its event
stream read back into token counts, the build cache's key, and the table. One test runs the real server
and skips where `make bench-llamacpp` has not built it yet."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import pytest_asyncio

from bench.loadgen import Chunk, StreamError, run_load
from bench.metrics import RequestTrace, summarize
from bench.peers import llamacpp_build
from bench.peers.llamacpp import LLAMACPP, TEXTGEN, comparison_table, main, scenarios
from bench.peers.llamacpp_build import CMAKE_ARGS, build_key, cached_binary, sdist_version
from bench.peers.llamacpp_client import EventDecoder, LlamaCppClient, chunk_of, completion_request, event_data
from bench.random_model import SHAPES, shape_config
from bench.workload import RequestSpec


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def partial(predicted: int, prompt: int = 3) -> dict:
    return {
        "content": "x",
        "tokens": [7],
        "stop": False,
        "tokens_predicted": predicted,
        "tokens_evaluated": prompt,
    }


# The request


def test_request_is_greedy_with_eos_ignored_and_exact_length():
    body = completion_request([11, 12, 13], 5)
    assert body["prompt"] == [11, 12, 13]  # token ids: the same prompt textgen gets
    assert body["n_predict"] == 5 and body["ignore_eos"] is True
    assert body["temperature"] == 0 and body["top_k"] == 1
    assert body["stream"] is True


def test_request_turns_the_prompt_cache_off():
    assert completion_request([1], 1)["cache_prompt"] is False


# The event stream


def test_events_split_across_reads_are_joined():
    decoder = EventDecoder()
    stream = sse(partial(1)) + sse(partial(2))
    pieces = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    events = [json.loads(d) for piece in pieces for d in decoder.feed(piece)]
    assert [e["tokens_predicted"] for e in events] == [1, 2]


def test_a_multibyte_character_split_across_reads_decodes():
    decoder = EventDecoder()
    stream = 'data: {"content": "é"}\n\n'.encode()
    cut = stream.index("é".encode()) + 1
    assert decoder.feed(stream[:cut]) == []
    assert json.loads(decoder.feed(stream[cut:])[0])["content"] == "é"


def test_comments_such_as_pings_are_dropped():
    assert EventDecoder().feed(b":\n\n" + sse(partial(1))) == [json.dumps(partial(1))]


def test_crlf_line_ends_are_accepted():
    assert EventDecoder().feed(b'data: {"a": 1}\r\n\r\n') == ['{"a": 1}']


def test_data_lines_of_one_event_join_with_newlines():
    assert event_data(b"event: x\ndata: one\ndata:two") == "one\ntwo"
    assert event_data(b"event: x") is None


def test_new_tokens_are_counted_from_tokens_predicted():
    # llama.cpp holds back a token that ends inside a UTF-8 character: the next event carries two.
    assert chunk_of(partial(1), 0) == Chunk(1, 3)
    assert chunk_of(partial(3), 1) == Chunk(2, 3)


def test_the_final_event_adds_no_tokens_already_sent():
    final = {"content": "", "stop": True, "tokens_predicted": 3, "tokens_evaluated": 3}
    assert chunk_of(final, 3) == Chunk(0, 3)


def test_an_error_event_is_a_stream_error():
    with pytest.raises(StreamError, match="context full"):
        chunk_of({"error": {"code": 500, "message": "context full"}}, 0)


# The client against a fake llama.cpp server


class FakeLlamaServer:
    """Answers `/completion` with `n_predict` tokens as chunked server-sent events, one per token but the
    second (held back, as for a split UTF-8 character); n_predict 999 gets HTTP 400."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = {}
        await reader.readline()
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        body = json.loads(await reader.readexactly(int(headers["content-length"])))
        self.bodies.append(body)
        n = body["n_predict"]
        if n == 999:
            message = b'{"error": {"message": "bad request"}}'
            writer.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(message), message)
            )
        else:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            events = [b":\n\n", *(sse(partial(i, len(body["prompt"]))) for i in range(1, n + 1) if i != 2)]
            events.append(sse({"stop": True, "tokens_predicted": n, "tokens_evaluated": len(body["prompt"])}))
            for event in events:
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(0.005)
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()


@pytest_asyncio.fixture
async def fake_llama():
    fake = FakeLlamaServer()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield LlamaCppClient("127.0.0.1", port), fake
    server.close()
    await server.wait_closed()


def spec(index: int, output_len: int) -> RequestSpec:
    return RequestSpec(index, 0.0, 3, output_len, "")


@pytest.mark.asyncio
async def test_the_load_generator_drives_llamacpp_through_its_client(fake_llama):
    client, fake = fake_llama
    result = await run_load(client, [spec(0, 5), spec(1, 1)], [[1, 2, 3], [4, 5, 6]], progress=False)
    first, second = result.traces
    assert first.ok and second.ok
    assert (first.output_tokens, second.output_tokens) == (5, 1)
    assert first.token_times_s[0] < first.token_times_s[1] == first.token_times_s[2]  # 2 held back
    assert [b["prompt"] for b in fake.bodies] == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.asyncio
async def test_prompt_tokens_are_the_servers_own_count(fake_llama):
    client, _ = fake_llama
    result = await run_load(client, [spec(0, 2)], [[1, 2, 3, 4]], progress=False)
    assert result.traces[0].prompt_tokens == 4


@pytest.mark.asyncio
async def test_an_http_error_is_the_requests_error(fake_llama):
    client, _ = fake_llama
    result = await run_load(client, [spec(0, 999)], [[1]], progress=False)
    assert result.traces[0].error.startswith("HTTP 400")


@pytest.mark.asyncio
async def test_an_unreachable_server_is_an_error_not_a_crash():
    result = await run_load(LlamaCppClient("127.0.0.1", 1), [spec(0, 1)], [[1]], progress=False)
    assert "cannot connect" in result.traces[0].error


# The build cache


def test_the_build_is_keyed_by_version_flags_and_cpu():
    key = build_key("0.3.36", CMAKE_ARGS, "flags: avx2")
    assert key.startswith("llama-cpp-python-0.3.36-")
    assert key == build_key("0.3.36", CMAKE_ARGS, "flags: avx2")
    assert key != build_key("0.3.37", CMAKE_ARGS, "flags: avx2")
    assert key != build_key("0.3.36", (*CMAKE_ARGS, "-DGGML_AVX512=OFF"), "flags: avx2")
    assert key != build_key("0.3.36", CMAKE_ARGS, "flags: avx2 avx512f")


def test_the_binary_is_kept_under_the_textgen_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTGEN_CACHE_DIR", str(tmp_path))
    binary = cached_binary("0.3.36")
    assert binary.parent.parent == tmp_path / "peers"
    assert binary.name == "llama-server"


def test_the_build_asks_for_the_server_alone_without_downloads():
    assert "-DLLAMA_CURL=OFF" in CMAKE_ARGS and "-DLLAMA_USE_PREBUILT_UI=OFF" in CMAKE_ARGS
    assert "-DCMAKE_BUILD_TYPE=Release" in CMAKE_ARGS and "-DGGML_NATIVE=ON" in CMAKE_ARGS
    assert llamacpp_build.TARGET == "llama-server"


def test_the_version_is_read_from_the_sdist_name():
    assert sdist_version("llama_cpp_python-0.3.36.tar.gz") == "0.3.36"


# The comparison


def test_the_workloads_are_the_issues():
    single, burst, poisson_2, poisson_4, long_prompt = scenarios(quick=False, seed=0)
    assert (single.config.num_requests, single.config.output_len_mean, single.concurrency) == (4, 128, 1)
    assert (burst.config.num_requests, burst.config.request_rate) == (32, math.inf)
    assert (poisson_2.config.request_rate, poisson_4.config.request_rate) == (2.0, 4.0)
    assert poisson_2.config.num_requests == poisson_4.config.num_requests == 64
    assert long_prompt.config.prompt_len_mean == 1000


def test_quick_runs_fewer_requests_of_the_same_kinds():
    full, quick = scenarios(quick=False, seed=0), scenarios(quick=True, seed=0)
    assert len(quick) == len(full)
    assert all(q.config.num_requests < f.config.num_requests for q, f in zip(quick, full, strict=True))


def test_the_table_gives_textgen_over_llamacpp():
    (single, *_) = scenarios(quick=True, seed=0)

    def run(seconds_per_token: float):
        trace = RequestTrace(0, 0.0, 1.0, [seconds_per_token * (i + 1) for i in range(4)], prompt_tokens=64)
        return [summarize([trace], 4 * seconds_per_token)]

    table = comparison_table([single], {TEXTGEN: run(0.1), LLAMACPP: run(0.05)})
    assert "textgen / llama.cpp" in table.splitlines()[0]
    rows = {line.split("|")[2].strip(): line.split("|")[-2].strip() for line in table.splitlines()[2:]}
    assert rows["output tok/s"] == "0.50x"
    assert rows["TPOT p50 s"] == "2.00x"
    assert rows["prompt tokens"] == "1.00x"


# The real server, where it has been built


@pytest.mark.skipif(
    not cached_binary(llamacpp_build.DEFAULT_VERSION).exists(), reason="llama-server not built"
)
def test_the_built_server_streams_exactly_the_asked_tokens(tmp_path):
    from bench.peers.llamacpp_server import LlamaServerProcess
    from engine.execution.loader import default_gguf_path

    binary = cached_binary(llamacpp_build.DEFAULT_VERSION)
    flags = ("-np", "2", "-t", "2", "-c", "4096")
    with LlamaServerProcess(binary, default_gguf_path(), tmp_path / "server.log", flags) as server:
        result = asyncio.run(run_load(server.client(), [spec(0, 6)], [[504, 3458, 314]], progress=False))
    (trace,) = result.traces
    assert trace.ok, trace.error
    assert (trace.output_tokens, trace.prompt_tokens) == (6, 3)


# A real shape's comparison (a tiny config here: the real shapes are for a quiet machine)


def tiny_shape_config(tmp_path) -> Path:
    """A config.json of the tiny shape, its vocabulary wide enough for SmolLM2's tokenizer."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(shape_config(dict(SHAPES["tiny"], vocab_size=49152 + 32)).to_dict()))
    return path


def quick_run(tmp_path, systems: str) -> dict:
    """`make bench-llamacpp BENCH_ARGS="--quick --config <tiny>"` on `systems`: its JSON record."""
    args = ["--quick", "--config", str(tiny_shape_config(tmp_path)), "--systems", systems, "--no-progress"]
    main([*args, "--output-dir", str(tmp_path / "results")])
    (path,) = (tmp_path / "results").glob("peer_llamacpp-*.json")
    return json.loads(path.read_text())


def assert_every_request_served(system: dict) -> None:
    for name, run in system["runs"].items():
        summary = run["summary"]
        assert summary["num_errors"] == 0, name
        assert summary["output_tokens"] == sum(t["expected_output_tokens"] for t in run["traces"]), name


def test_a_shapes_quick_run_serves_its_q4_1_gguf_in_textgen(tmp_path):
    record = quick_run(tmp_path, "textgen")
    assert record["gguf"].endswith(".Q4_1.gguf")
    textgen = record["systems"][TEXTGEN]
    assert textgen["command"][-2:] == ["--model", record["gguf"]]
    assert textgen["startup_s"] > 0
    assert_every_request_served(textgen)


@pytest.mark.skipif(
    not cached_binary(llamacpp_build.DEFAULT_VERSION).exists(),
    reason="llama-server not built (`make bench-llamacpp` builds it once, about 12 minutes on 2 cores)",
)
def test_a_shapes_quick_run_serves_the_same_gguf_in_both(tmp_path):
    record = quick_run(tmp_path, "textgen,llamacpp")
    for system in (TEXTGEN, LLAMACPP):
        assert_every_request_served(record["systems"][system])
    assert record["systems"][LLAMACPP]["command"][2] == record["gguf"]  # llama-server -m <the same file>
