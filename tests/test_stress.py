"""Reliability under load: `bench/stress/run.py`'s scenarios at small sizes, and property-based fuzzing of the
gRPC API over the real server (every request field, and raw malformed bytes on every method).

`make stress` runs the scenarios at full size, and this module's fuzzing with TEXTGEN_FUZZ_EXAMPLES
examples per property (random ones; here a fixed, derandomized set).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.stress.faults import engine_faults
from bench.stress.flood import unauthenticated_flood
from bench.stress.grammar import SLOWDOWN_CHECK, bystanders_under_adversarial_grammars
from bench.stress.load import cancellation_storm, deadlines, memory_pressure, overload
from bench.stress.process import sigterm_during_load, soak
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc

# ---- the scenarios, small ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


async def test_overload_ends_every_call_ok_or_resource_exhausted_and_leaves_the_engine_idle(tiny_llama):
    result = await overload(tiny_llama, num_streams=40, max_new_tokens=16)
    assert result.failures() == []


async def test_a_cancellation_storm_frees_every_kv_block_and_changes_no_greedy_output(tiny_llama):
    result = await cancellation_storm(tiny_llama, num_streams=60, concurrency=30)
    assert result.failures() == []


async def test_deadlines_under_load_end_ok_or_deadline_exceeded_and_free_the_kv_blocks(tiny_llama):
    result = await deadlines(tiny_llama, num_calls=40)
    assert result.failures() == []


async def test_requests_beyond_the_kv_pool_are_preempted_and_all_complete(tiny_llama):
    result = await memory_pressure(
        tiny_llama, num_requests=4, prompt_len=60, max_new_tokens=24, num_kv_blocks=12
    )
    assert result.failures() == []


async def test_an_unauthenticated_flood_holds_no_memory_no_thread_per_connection_and_is_closed(
    tiny_llama, tmp_path
):
    result = await unauthenticated_flood(
        tiny_llama, tmp_path, num_watches=20, name_bytes=256 * 1024, num_idle=60, idle_timeout_s=1.0
    )
    assert result.failures() == []


async def test_an_engine_fault_fails_only_the_requests_it_touches(tiny_llama):
    result = await engine_faults(tiny_llama, max_new_tokens=16)
    assert result.failures() == []


async def test_adversarial_grammars_fail_alone_and_their_bystanders_keep_their_tokens(tiny_llama):
    result = await bystanders_under_adversarial_grammars(tiny_llama, num_plain=2, max_new_tokens=24)
    assert result.failures(SLOWDOWN_CHECK) == []  # a timing is for `make stress` on a quiet machine


async def test_sigterm_during_load_completes_every_stream_in_flight_and_exits_zero(tiny_llama, tmp_path):
    result = await sigterm_during_load(
        tiny_llama, tmp_path, num_streams=8, max_batch_size=4, max_new_tokens=50
    )
    assert result.failures() == []


async def test_a_short_soak_ends_every_call_with_an_expected_status(tiny_llama, tmp_path):
    result = await soak(tiny_llama, tmp_path, minutes=0.05, concurrency=4, sample_every_s=1.0)
    # Drift needs minutes to mean anything; `make stress --soak-minutes 20` measures it.
    drift = ("RSS flat (drift within 5%)", "open file descriptors flat", "threads flat")
    assert result.failures(*drift) == []


# ---- fuzzing ----------------------------------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("TEXTGEN_FUZZ_EXAMPLES", "25"))
fuzzing = settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize="TEXTGEN_FUZZ_EXAMPLES" not in os.environ,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DEFAULT_MAX_NEW_TOKENS = 8
MAX_NEW_TOKENS_LIMIT = 64
VOCAB = 49152  # the SmolLM2 tokenizer's, which the tiny model uses
UINT32 = 2**32 - 1
INT32 = 2**31


def fields(**strategies) -> st.SearchStrategy[dict]:
    """Any subset of the named fields, each drawn from its strategy."""
    return st.fixed_dictionaries({}, optional=strategies)


# Each message is drawn either within the documented ranges (to reach generation) or from anywhere in its
# fields' types (nan, inf, huge, negative, past the vocabulary or the context). Protobuf strings are UTF-8:
# a lone surrogate cannot even be sent (the malformed bytes below cover that).
characters = st.characters(exclude_categories=["Cs"])
texts = st.text(characters, max_size=300)
anywhere = st.floats(width=32)
int32s = st.integers(-INT32, INT32 - 1)
seeds = st.integers(0, 2**64 - 1)
any_token_ids = st.integers(0, VOCAB - 1) | st.integers(0, UINT32)


def token_ids(ids: list[int]) -> pb.TokenIds:
    return pb.TokenIds(ids=ids)


def chats(roles: st.SearchStrategy[str], contents: st.SearchStrategy[str], max_messages: int):
    messages = st.lists(fields(role=roles, content=contents), max_size=max_messages)
    return messages.map(lambda ms: pb.ChatInput(messages=[pb.ChatMessage(**m) for m in ms]))


plausible_chats = chats(st.sampled_from(["system", "user", "assistant"]), st.text(characters, max_size=50), 4)
any_chats = chats(st.sampled_from(["system", "user", "assistant", "tool", ""]) | texts, texts, 6)
sampling_parameters = (
    fields(
        temperature=st.floats(0, 2, width=32),
        top_k=st.integers(0, 100),
        top_p=st.floats(2**-7, 1, width=32),
        min_p=st.floats(0, 1, width=32),
        repetition_penalty=st.floats(0.5, 2, width=32),
        frequency_penalty=st.floats(-2, 2, width=32),
        presence_penalty=st.floats(-2, 2, width=32),
        seed=seeds,
    )
    | fields(
        temperature=anywhere,
        top_k=int32s,
        top_p=anywhere,
        min_p=anywhere,
        repetition_penalty=anywhere,
        frequency_penalty=anywhere,
        presence_penalty=anywhere,
        seed=seeds,
    )
).map(lambda f: pb.SamplingParameters(**f))
stopping_criteria = (
    fields(
        max_new_tokens=st.integers(0, MAX_NEW_TOKENS_LIMIT),
        stop_sequences=st.lists(st.text(characters, min_size=1, max_size=8), max_size=4),
        ignore_eos=st.booleans(),
    )
    | fields(
        max_new_tokens=st.integers(0, UINT32),
        stop_sequences=st.lists(texts, max_size=20),
        ignore_eos=st.booleans(),
    )
).map(lambda f: pb.StoppingCriteria(**f))
inputs = st.one_of(
    st.text(characters, min_size=1, max_size=100).map(lambda text: {"prompt": text}),
    plausible_chats.map(lambda chat: {"chat": chat}),
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=64).map(
        lambda ids: {"input_ids": token_ids(ids)}
    ),
    # Any input, none or several (in a oneof the last one set wins); token ids up to past the context.
    fields(
        prompt=texts,
        chat=any_chats,
        input_ids=(
            st.lists(any_token_ids, max_size=64)
            | st.builds(lambda n, token: [token] * n, st.integers(1, 2100), any_token_ids)
        ).map(token_ids),
    ),
)
generate_requests = st.builds(
    lambda input_fields, other_fields: pb.GenerateRequest(**input_fields, **other_fields),
    inputs,
    fields(request_id=texts, sampling=sampling_parameters, stopping=stopping_criteria, priority=int32s),
)
tokenize_requests = fields(text=texts, chat=plausible_chats | any_chats).map(
    lambda f: pb.TokenizeRequest(**f)
)

# Raw request bytes: anything, and valid messages cut short or with one byte changed.
VALID_BYTES = pb.GenerateRequest(
    prompt="Hello", stopping=pb.StoppingCriteria(max_new_tokens=4, stop_sequences=["é"])
).SerializeToString()
raw_bytes = (
    st.binary(max_size=256)
    | st.integers(0, len(VALID_BYTES) - 1).map(lambda n: VALID_BYTES[:n])
    | st.tuples(st.integers(0, len(VALID_BYTES) - 1), st.integers(0, 255)).map(
        lambda change: VALID_BYTES[: change[0]] + bytes([change[1]]) + VALID_BYTES[change[0] + 1 :]
    )
)
# What the README's "Status codes" documents for these calls: served, or INVALID_ARGUMENT with its reason.
FIELD_STATUSES = {"OK", "INVALID_ARGUMENT/INVALID_ARGUMENT", "INVALID_ARGUMENT/PROMPT_TOO_LONG"}
RAW_BYTES_STATUSES = FIELD_STATUSES | {"INVALID_ARGUMENT/MALFORMED_REQUEST"}
METHODS = {
    "Generate": "unary",
    "GenerateStream": "stream",
    "GetModelInfo": "unary",
    "Tokenize": "unary",
}


@pytest.fixture(scope="module")
def tally():
    """Calls by status code per fuzzing test; written to $TEXTGEN_FUZZ_TALLY (JSON) when it is set."""
    counts: dict[str, Counter] = {}
    yield counts
    if path := os.environ.get("TEXTGEN_FUZZ_TALLY"):
        Path(path).write_text(json.dumps({test: dict(c) for test, c in counts.items()}, indent=1))


@pytest.fixture(scope="module")
def fuzzed_server(start_server):
    return start_server(
        default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS, max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT
    )


@pytest.fixture(scope="module")
def channel(fuzzed_server):
    with grpc.insecure_channel(fuzzed_server.target) as channel:
        yield channel


@pytest.fixture
def fuzzed_stub(channel):
    return textgen_pb2_grpc.TextGenerationServiceStub(channel)


def status_of(call, streaming: bool = False) -> tuple[str, int, str]:
    """Run `call()` (a stream to its end): its status as 'CODE' or 'CODE/ErrorInfo reason', the number of
    field violations in its BadRequest, and the status message."""
    try:
        response = call()
        if streaming:
            list(response)
        return "OK", 0, ""
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)
        reason, violations = "", 0
        for detail in status.details if status is not None else []:
            error_info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
            if detail.Unpack(error_info):
                reason = f"/{error_info.reason}"
            elif detail.Unpack(bad_request):
                violations = len(bad_request.field_violations)
        return error.code().name + reason, violations, error.details() or ""


def assert_healthy(server, channel, wait_until_idle) -> None:
    """SERVING, a greedy request answered, and the engine idle with every KV block free."""
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    response = textgen_pb2_grpc.TextGenerationServiceStub(channel).Generate(
        pb.GenerateRequest(prompt="Hello", stopping=pb.StoppingCriteria(max_new_tokens=4)), timeout=60
    )
    assert response.usage.completion_tokens >= 1
    wait_until_idle(server.engine)


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_fuzzed_generate_requests_are_served_or_invalid_argument_naming_a_field(
    rpc, fuzzed_stub, channel, fuzzed_server, tally, wait_until_idle
):
    codes = tally.setdefault(f"{rpc} fields", Counter())

    @fuzzing
    @given(request=generate_requests)
    def call(request):
        status, violations, message = status_of(
            lambda: getattr(fuzzed_stub, rpc)(request, timeout=60), rpc == "GenerateStream"
        )
        codes[status] += 1
        assert status in FIELD_STATUSES, message
        assert status == "OK" or violations, f"no field named: {message}"

    call()
    assert_healthy(fuzzed_server, channel, wait_until_idle)


def test_fuzzed_tokenize_requests_are_served_or_invalid_argument_naming_a_field(
    fuzzed_stub, channel, fuzzed_server, tally, wait_until_idle
):
    codes = tally.setdefault("Tokenize fields", Counter())

    @fuzzing
    @given(request=tokenize_requests)
    def call(request):
        status, violations, message = status_of(lambda: fuzzed_stub.Tokenize(request, timeout=60))
        codes[status] += 1
        assert status in FIELD_STATUSES, message
        assert status == "OK" or violations, f"no field named: {message}"

    call()
    assert_healthy(fuzzed_server, channel, wait_until_idle)


@pytest.mark.parametrize("method", METHODS)
def test_malformed_request_bytes_are_served_or_invalid_argument(
    method, channel, fuzzed_server, tally, wait_until_idle
):
    codes = tally.setdefault(f"{method} raw bytes", Counter())
    path = f"/textgen.v1.TextGenerationService/{method}"
    streaming = METHODS[method] == "stream"
    send = channel.unary_stream(path) if streaming else channel.unary_unary(path)
    seen = []

    @fuzzing
    @given(data=raw_bytes)
    def call(data):
        status, _, message = status_of(lambda: send(data, timeout=60), streaming)
        codes[status] += 1
        if status not in RAW_BYTES_STATUSES:
            seen.append(f"{data!r}: {status} {message}")

    call()  # every example runs; then one assertion lists what went wrong
    assert_healthy(fuzzed_server, channel, wait_until_idle)
    assert seen == [], f"{len(seen)} of {sum(codes.values())} calls: {seen[:3]}"
