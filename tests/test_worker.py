"""SMG's vLLM worker protocol (service/worker/servicer.py) through the generated client stubs of the pinned
`smg-grpc-proto`: what tests/test_smg.py does not reach through the gateway."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import zipfile

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2
from transformers import AutoTokenizer

from engine.request import StoppingParams
from service.worker.servicer import block_id
from tests.conftest import ServerThread

BLOCK_SIZE = 8


@pytest.fixture(scope="module")
def worker_server(start_server):
    return start_server(kv_block_size=BLOCK_SIZE)  # a server of its own: these tests flush its prefix cache


@pytest.fixture(scope="module")
def worker(worker_server):
    with grpc.insecure_channel(worker_server.target) as channel:
        yield pb_grpc.VllmEngineStub(channel)


def request(ids: list[int], stream: bool = False, **sampling) -> pb.GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return pb.GenerateRequest(
        tokenized=pb.TokenizedInput(input_ids=ids),
        sampling_params=pb.SamplingParams(**sampling),
        stream=stream,
    )


def test_streamed_chunks_add_up_to_the_unary_complete(worker):
    unary = list(worker.Generate(request([5, 6, 7], max_tokens=6, ignore_eos=True)))
    assert [r.WhichOneof("response") for r in unary] == ["complete"]
    complete = unary[0].complete
    assert len(complete.output_ids) == complete.completion_tokens == 6
    assert complete.finish_reason == "length" and complete.prompt_tokens == 3
    streamed = list(worker.Generate(request([5, 6, 7], stream=True, max_tokens=6, ignore_eos=True)))
    chunks = [r.chunk for r in streamed if r.WhichOneof("response") == "chunk"]
    assert [t for c in chunks for t in c.token_ids] == list(complete.output_ids)
    last = streamed[-1].complete  # as vLLM's servicer: the last chunk's tokens again, and the finish
    assert streamed[-1].WhichOneof("response") == "complete" and last.finish_reason == "length"
    assert list(last.output_ids) == list(chunks[-1].token_ids)


def test_n_completions_each_end_with_their_logprobs(worker):
    responses = list(worker.Generate(request([5, 6, 7], max_tokens=4, ignore_eos=True, n=2, logprobs=2)))
    completes = sorted((r.complete for r in responses), key=lambda c: c.index)
    assert [c.index for c in completes] == [0, 1]
    for complete in completes:
        logprobs = complete.output_logprobs
        assert list(logprobs.token_ids) == list(complete.output_ids)
        assert len(logprobs.token_logprobs) == 4 and all(lp <= 0 for lp in logprobs.token_logprobs)
        assert all(len(top.token_ids) == 2 for top in logprobs.top_logprobs)


def test_a_choice_constraint_restricts_the_output(worker, worker_server):
    choices = ["red", "green", "blue"]
    sampling = dict(max_tokens=8, temperature=1.0, seed=3, choice=pb.ChoiceConstraint(choices=choices))
    (response,) = worker.Generate(request([5, 6, 7], **sampling))
    assert worker_server.engine.decode(list(response.complete.output_ids)) in choices


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (dict(logit_bias={5: 1.0}), "sampling_params.logit_bias"),
        (dict(temperature=-1.0), "sampling_params.temperature"),
        (dict(stop_token_ids=[9]), "sampling_params.stop_token_ids"),
        (dict(grammar="root ::= 'a'"), "sampling_params.grammar"),
        (dict(max_tokens=10**6), "sampling_params.max_tokens"),
    ],
)
def test_what_cannot_be_served_is_refused_naming_its_field(worker, sampling, field):
    with pytest.raises(grpc.RpcError) as error:
        list(worker.Generate(request([5, 6, 7], **sampling)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()


def test_what_has_no_meaning_here_answers_unimplemented(worker):
    image = pb.GenerateRequest(
        tokenized=pb.TokenizedInput(input_ids=[5]), mm_inputs=pb.MultimodalInputs(mm_hashes=["x"])
    )
    calls = [
        lambda: list(worker.Generate(image)),
        lambda: worker.Embed(pb.EmbedRequest(tokenized=pb.TokenizedInput(input_ids=[5]))),
        lambda: worker.StartProfile(common_pb2.StartProfileRequest()),
        lambda: worker.StopProfile(common_pb2.StopProfileRequest()),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert error.value.details()


def test_abort_cancels_a_running_request_and_frees_its_kv(worker, worker_server, wait_until_idle):
    stream = worker.Generate(
        pb.GenerateRequest(
            request_id="to-abort",
            tokenized=pb.TokenizedInput(input_ids=list(range(5, 40))),
            sampling_params=pb.SamplingParams(max_tokens=1500, ignore_eos=True),
            stream=True,
        )
    )
    next(stream)
    worker.Abort(pb.AbortRequest(request_ids=["to-abort", "unknown"]))
    with pytest.raises(grpc.RpcError) as error:
        list(stream)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    wait_until_idle(worker_server.engine)  # the aborted request's KV is freed


def test_info_health_and_loads_describe_the_served_model(worker, worker_server, wait_until_idle):
    engine = worker_server.engine
    assert worker.HealthCheck(pb.HealthCheckRequest()).healthy
    model = worker.GetModelInfo(pb.GetModelInfoRequest())
    assert model.max_context_length == engine.max_context_len
    assert list(model.eos_token_ids) == engine.model_info.eos_token_ids
    assert model.architectures == ["LlamaForCausalLM"]
    server = worker.GetServerInfo(pb.GetServerInfoRequest())
    assert server.block_size == BLOCK_SIZE and server.data_parallel_size == 1
    wait_until_idle(engine)
    (load,) = worker.GetLoads(pb.GetLoadsRequest()).loads
    assert (load.num_running_reqs, load.num_waiting_reqs, load.token_usage) == (0, 0, 0.0)
    assert load.max_total_num_tokens == engine.load.num_kv_blocks * BLOCK_SIZE


def test_get_tokenizer_streams_a_zip_of_the_served_tokenizer(worker, worker_server, tmp_path):
    chunks = list(worker.GetTokenizer(common_pb2.GetTokenizerRequest()))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    assert all(not c.sha256 for c in chunks[:-1])
    with zipfile.ZipFile(io.BytesIO(data)) as bundle:
        assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(bundle.namelist())
        bundle.extractall(tmp_path)
    served, engine = AutoTokenizer.from_pretrained(tmp_path), worker_server.engine
    chat = [{"role": "user", "content": "Hi there, how are you?"}]
    assert served("Hello, world!", add_special_tokens=False).input_ids == engine.tokenize("Hello, world!")
    assert list(served.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]) == (
        engine.apply_chat_template(chat)
    )


def test_kv_events_name_each_stored_block_resume_from_a_cursor_and_flush_clears(worker, worker_server):
    log = worker_server.engine.kv_events
    start = log.last_sequence_number
    stream = worker.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(start_sequence_number=start))
    prompt = list(range(200, 200 + 2 * BLOCK_SIZE + 3))
    list(worker.Generate(request(prompt, max_tokens=1)))
    batch = next(stream)
    assert batch.sequence_number == start + 1
    (event,) = batch.events
    blocks = event.stored.blocks
    assert [t for b in blocks for t in b.token_ids] == prompt[: 2 * BLOCK_SIZE]
    assert all(b.block_size == BLOCK_SIZE for b in blocks)
    assert not event.stored.HasField("parent_block_hash")
    assert blocks[0].block_hash == block_id(log.since(start)[0].events[0].block_hashes[0])
    load, engine = batch.load, worker_server.engine  # the engine's load, read when the batch was sent
    assert 0 <= load.token_usage <= 1 and load.sample == batch.sequence_number
    assert load.max_total_num_tokens == engine.load.num_kv_blocks * BLOCK_SIZE

    flushed = worker.FlushCache(common_pb2.FlushCacheRequest())
    assert flushed.success
    assert next(stream).events[0].WhichOneof("data") == "cleared"
    stream.cancel()

    replay = worker.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(start_sequence_number=start))
    assert next(replay).sequence_number == start + 1  # a subscriber that reconnects misses nothing
    replay.cancel()
    for cursor in (log.base - 1, log.last_sequence_number + 1):  # an earlier process's; never published
        refused = worker.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(start_sequence_number=cursor))
        with pytest.raises(grpc.RpcError) as error:
            next(refused)
        assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_a_subscriber_that_falls_behind_the_history_ends_data_loss(worker, worker_server, monkeypatch):
    log, engine = worker_server.engine.kv_events, worker_server.engine
    stream = worker.SubscribeKvEvents(
        common_pb2.SubscribeKvEventsRequest(start_sequence_number=log.last_sequence_number)
    )
    stopping = StoppingParams(max_new_tokens=1)
    engine.generate([list(range(500, 500 + BLOCK_SIZE + 1))], stopping=stopping)
    last = log.last_sequence_number
    while next(stream).sequence_number < last:  # read up to the last batch: the stream waits for the next
        pass
    monkeypatch.setattr(log, "max_batches", 1)  # the history keeps only the last batch from now on
    with worker_server.loop_held():  # the stream cannot send while two batches are published
        for offset in (600, 700):
            engine.generate([list(range(offset, offset + BLOCK_SIZE + 1))], stopping=stopping)
    with pytest.raises(grpc.RpcError) as error:
        next(stream)
    assert error.value.code() == grpc.StatusCode.DATA_LOSS


def test_a_subscriber_from_0_after_the_history_lost_the_start_gets_a_snapshot_of_the_cache(
    worker, worker_server, monkeypatch
):
    log = worker_server.engine.kv_events
    monkeypatch.setattr(log, "max_batches", 1)  # the history keeps only the last batch from now on
    for offset in (300, 400):  # two batches: the first one published is gone
        list(worker.Generate(request(list(range(offset, offset + BLOCK_SIZE + 1)), max_tokens=1)))
    assert log.since(0) is None
    cached = {block_id(h) for e in log.snapshot().events[1:] for h in e.block_hashes}  # the engine idles
    stream = worker.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(start_sequence_number=0))
    snapshot = next(stream)
    stream.cancel()
    assert (snapshot.snapshot.index, snapshot.snapshot.count) == (0, 1)
    assert snapshot.sequence_number == log.last_sequence_number
    assert snapshot.events[0].WhichOneof("data") == "cleared"
    stored = {b.block_hash: list(b.token_ids) for e in snapshot.events[1:] for b in e.stored.blocks}
    assert snapshot.snapshot.blocks == len(stored)
    assert stored.keys() == cached
    assert list(range(400, 400 + BLOCK_SIZE)) in stored.values()


@pytest.fixture(scope="module")
def http_server(server_config):
    thread = ServerThread(dataclasses.replace(server_config(), http_port=0)).start()
    yield thread
    thread.stop()


def test_the_http_front_serves_what_gateways_read_of_a_worker(http_server, wait_until_idle):
    base, engine = f"http://127.0.0.1:{http_server.server.http.port}", http_server.engine
    assert httpx.get(f"{base}/version").json()["version"].startswith("textgen")
    (model,) = httpx.get(f"{base}/v1/models").json()["data"]
    assert (model["root"], model["max_model_len"]) == (engine.model_info.name, engine.max_context_len)
    wait_until_idle(engine)
    loads = httpx.get(f"{base}/v1/loads").json()
    assert loads["dp_rank_count"] == 1
    (load,) = loads["loads"]
    assert (load["num_running_reqs"], load["num_waiting_reqs"], load["token_usage"]) == (0, 0, 0.0)
    assert load["max_total_num_tokens"] == engine.load.num_kv_blocks * engine.model_info.kv_block_size
    response = httpx.get(f"{base}/metrics")
    samples = {s.name: s for family in text_string_to_metric_families(response.text) for s in family.samples}
    assert samples["vllm:num_requests_running"].value == samples["vllm:num_requests_waiting"].value == 0
    assert samples["vllm:kv_cache_usage_perc"].labels["model_name"] == engine.model_info.name
    config = samples["vllm:cache_config_info"].labels
    assert (config["block_size"], config["num_gpu_blocks"]) == (
        str(engine.model_info.kv_block_size),
        str(engine.load.num_kv_blocks),
    )


def test_api_keys_apply_to_the_worker_protocol(server_config):
    keyed = ServerThread(dataclasses.replace(server_config(), api_keys=("worker-key-0123456789",))).start()
    try:
        with grpc.insecure_channel(keyed.target) as channel:
            stub = pb_grpc.VllmEngineStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.HealthCheck(pb.HealthCheckRequest())
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            key = (("authorization", "Bearer worker-key-0123456789"),)
            assert stub.HealthCheck(pb.HealthCheckRequest(), metadata=key).healthy
    finally:
        keyed.stop()


def test_a_loading_server_is_unhealthy_and_refuses_generation_unavailable(unloaded_server):
    with grpc.insecure_channel(unloaded_server.target) as channel:
        stub = pb_grpc.VllmEngineStub(channel)
        health = stub.HealthCheck(pb.HealthCheckRequest())
        assert not health.healthy and "loading" in health.message
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(request([5, 6, 7], max_tokens=2)))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        unloaded_server.load()
        assert stub.HealthCheck(pb.HealthCheckRequest()).healthy
        unloaded_server.run(unloaded_server.server.retire())  # the drain: in flight finish, new ones refused
        assert not stub.HealthCheck(pb.HealthCheckRequest()).healthy
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(request([5, 6, 7], max_tokens=2)))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
