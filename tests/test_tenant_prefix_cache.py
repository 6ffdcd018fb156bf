"""The prefix cache is partitioned by tenant: with API keys, one key never reuses (or learns of) another's
prompt blocks unless the server shares its cache; `cache_salt` partitions further, on both fronts."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import grpc
import openai
import pytest
from conftest import ServerThread

from engine.core.kv_cache import block_hashes, cache_seed
from engine.request import GenerationRequest, StoppingParams
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc
from service.config import parse_config

KEY_A = "tenant-a-0123456789"
KEY_B = "tenant-b-0123456789"
PROMPT_TOKENS = 80  # five whole blocks of 16
_prompts = itertools.count(1)


def fresh_prompt() -> list[int]:
    """Token ids no earlier test sent, so each test starts with nothing of its prompt cached."""
    first = next(_prompts) * 7
    return [first, *range(100, 100 + PROMPT_TOKENS - 1)]


def start(server_config, **overrides) -> ServerThread:
    config = dataclasses.replace(server_config(), api_keys=(KEY_A, KEY_B), http_port=0, **overrides)
    return ServerThread(config).start()


@pytest.fixture(scope="module")
def isolated(server_config):
    server = start(server_config)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared(server_config):
    server = start(server_config, shared_prefix_cache=True)
    yield server
    server.stop()


def cached_tokens(server: ServerThread, key: str, prompt: list[int], cache_salt: str = "") -> int:
    """A gRPC Generate of `prompt` with `key`; the prompt tokens its answer says the cache held."""
    request = pb.GenerateRequest(
        input_ids=pb.TokenIds(ids=prompt),
        stopping=pb.StoppingCriteria(max_new_tokens=1),
        cache_salt=cache_salt,
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
        response = stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
    return response.usage.cached_prompt_tokens


def http_cached_tokens(
    server: ServerThread, key: str, prompt: list[int], cache_salt: str | None = None
) -> int:
    """The same over HTTP with the openai client: `usage.prompt_tokens_details.cached_tokens`."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http.port}/v1", api_key=key)
    extra = {} if cache_salt is None else {"cache_salt": cache_salt}
    completion = client.completions.create(
        model=server.engine.model_info.name, prompt=prompt, max_tokens=1, temperature=0, extra_body=extra
    )
    return completion.usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("ask", [cached_tokens, http_cached_tokens])
def test_another_key_does_not_hit_the_prompt_of_a_key(isolated, ask):
    prompt = fresh_prompt()
    assert ask(isolated, KEY_A, prompt) == 0
    assert ask(isolated, KEY_B, prompt) == 0
    assert ask(isolated, KEY_A, prompt) > 0  # the same key hits: the cache is on


@pytest.mark.parametrize("ask", [cached_tokens, http_cached_tokens])
def test_with_a_shared_cache_another_key_hits(shared, ask):
    prompt = fresh_prompt()
    assert ask(shared, KEY_A, prompt) == 0
    assert ask(shared, KEY_B, prompt) > 0


@pytest.mark.parametrize("ask", [cached_tokens, http_cached_tokens])
def test_the_same_cache_salt_hits_and_another_misses(isolated, ask):
    prompt = fresh_prompt()
    assert ask(isolated, KEY_A, prompt, "salt-1") == 0
    assert ask(isolated, KEY_A, prompt, "salt-1") > 0
    assert ask(isolated, KEY_A, prompt, "salt-2") == 0
    assert ask(isolated, KEY_A, prompt) == 0  # no salt is a partition of its own


def test_with_a_shared_cache_the_same_salt_hits_across_keys(shared):
    prompt = fresh_prompt()
    assert cached_tokens(shared, KEY_A, prompt, "team") == 0
    assert cached_tokens(shared, KEY_B, prompt, "team") > 0
    assert cached_tokens(shared, KEY_B, prompt, "other") == 0


def test_a_salt_does_not_reach_another_keys_partition(isolated):
    prompt = fresh_prompt()
    assert cached_tokens(isolated, KEY_A, prompt, "team") == 0
    assert cached_tokens(isolated, KEY_B, prompt, "team") == 0


def test_an_over_long_salt_is_invalid_on_both_fronts(isolated):
    with pytest.raises(grpc.RpcError) as refused:
        cached_tokens(isolated, KEY_A, fresh_prompt(), "s" * 1025)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache_salt" in refused.value.details()
    with pytest.raises(openai.BadRequestError) as bad:
        http_cached_tokens(isolated, KEY_A, fresh_prompt(), "s" * 1025)
    assert bad.value.body["param"] == "cache_salt"


def test_a_partitioned_request_is_isolated_in_the_engine(tiny_engine):
    """Without a server: the engine's own rule, which both fronts rely on."""
    prompt = fresh_prompt()

    async def generate(request: GenerationRequest) -> int:
        return [event async for event in tiny_engine.submit(request)][-1].cached_prompt_tokens

    def cached(**partition: str) -> int:
        request = GenerationRequest(prompt, stopping=StoppingParams(max_new_tokens=1), **partition)
        return asyncio.run(generate(request))

    assert cached() == 0
    assert cached() > 0
    assert cached(cache_salt="x") == 0
    assert cached(cache_tenant="t") == 0
    assert cached(cache_tenant="t", cache_salt="x") == 0
    assert cached(cache_tenant="t", cache_salt="x") > 0


def test_partitions_start_distinct_hash_chains():
    tokens = list(range(32))
    unsalted = block_hashes(tokens, 16, [])
    assert cache_seed("", "") == b""
    seeds = {cache_seed("", "x"), cache_seed("x", ""), cache_seed("t", "x"), cache_seed("tx", "")}
    assert len(seeds) == 4
    chains = [block_hashes(tokens, 16, [], seed) for seed in seeds]
    assert all(chain[0] not in unsalted and chain[1] not in unsalted for chain in chains)


def test_shared_prefix_cache_flag_and_variable(monkeypatch):
    assert parse_config([]).shared_prefix_cache is False
    assert parse_config(["--shared-prefix-cache"]).shared_prefix_cache is True
    monkeypatch.setenv("TEXTGEN_SHARED_PREFIX_CACHE", "1")
    assert parse_config([]).shared_prefix_cache is True
