"""What evaluation harnesses and load testers send besides the basics, driven by the official `openai` client
and raw HTTP: `echo` with `logprobs` (lm-eval's log-likelihood requests), `stream_options
.continuous_usage_stats` (guidellm's default), `logit_bias` (both fronts), and vLLM's `/tokenize` and
`/detokenize`."""

from __future__ import annotations

import asyncio

import openai
import pytest
from conftest import base_url
from test_openai_http import assert_openai_error, post

from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def stub(http_server):
    import grpc

    with grpc.insecure_channel(http_server.target) as channel:
        yield textgen_pb2_grpc.TextGenerationServiceStub(channel)


def grpc_scored(stub, max_new_tokens: int, top_logprobs: int = 1) -> pb.GenerateResponse:
    """PROMPT's tokens scored and `max_new_tokens` greedy tokens, through gRPC."""
    request = pb.GenerateRequest(
        prompt=PROMPT,
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
        top_logprobs=top_logprobs,
        prompt_logprobs=True,
    )
    return stub.Generate(request, timeout=30)


def offsets(tokens: list[str], start: int = 0) -> list[int]:
    return [start + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


# ---- echo ----------------------------------------------------------------------------------------


def test_echo_puts_the_prompt_and_its_scored_tokens_before_the_completion(client, model, stub):
    scored = grpc_scored(stub, max_new_tokens=3)
    num_prompt = len(scored.prompt_tokens) + 1  # gRPC scores the prompt from its second token

    completion = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=3, logprobs=1, echo=True, **GREEDY
    )

    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert choice.text == PROMPT + scored.text
    assert len(logprobs.tokens) == num_prompt + 3 == completion.usage.prompt_tokens + 3
    assert logprobs.tokens[1:] == [t.text for t in scored.prompt_tokens] + [t.text for t in scored.tokens]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = [t.logprob for t in scored.prompt_tokens] + [t.logprob for t in scored.tokens]
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    for top, token in zip(logprobs.top_logprobs[1:], [*scored.prompt_tokens, *scored.tokens], strict=True):
        assert list(top) == [a.text for a in token.top_logprobs]
    prompt_tokens, generated = logprobs.tokens[:num_prompt], logprobs.tokens[num_prompt:]
    assert logprobs.text_offset == offsets(prompt_tokens) + offsets(generated, start=len(PROMPT))
    assert completion.usage.completion_tokens == 3


def test_echo_with_max_tokens_0_answers_the_prompt_alone_scored(client, model, stub):
    scored = grpc_scored(stub, max_new_tokens=1)

    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=0, logprobs=1, echo=True)

    choice = completion.choices[0]
    assert choice.text == PROMPT
    assert choice.finish_reason == "length"
    assert choice.logprobs.tokens[1:] == [t.text for t in scored.prompt_tokens]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [t.logprob for t in scored.prompt_tokens], abs=1e-5
    )
    assert completion.usage.prompt_tokens == len(choice.logprobs.tokens)
    assert completion.usage.completion_tokens == 0


def test_a_streamed_echo_concatenates_to_the_unstreamed_answer(client, model):
    params = {"model": model, "prompt": PROMPT, "max_tokens": 4, "logprobs": 2, "echo": True, **GREEDY}
    whole = client.completions.create(**params).choices[0]

    chunks = list(client.completions.create(**params, stream=True))

    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[0].choices[0].text.startswith(PROMPT)
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in chunks for v in getattr(c.choices[0].logprobs, name)] == getattr(
            whole.logprobs, name
        )


def test_a_streamed_echo_with_max_tokens_0_is_one_chunk_of_the_prompt(client, model):
    chunks = list(
        client.completions.create(
            model=model, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True, stream=True
        )
    )

    (chunk,) = chunks
    assert chunk.choices[0].text == PROMPT
    assert chunk.choices[0].finish_reason == "length"
    assert chunk.choices[0].logprobs.token_logprobs[0] is None


def test_echo_of_token_ids_is_their_text(client, model, http_server):
    ids = http_server.engine.tokenize(PROMPT)

    completion = client.completions.create(model=model, prompt=ids, max_tokens=2, echo=True, **GREEDY)

    plain = client.completions.create(model=model, prompt=ids, max_tokens=2, **GREEDY)
    assert completion.choices[0].text == PROMPT + plain.choices[0].text
    assert completion.choices[0].logprobs is None


def test_echo_starts_every_one_of_n_completions(client, model):
    completion = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=3, n=2, logprobs=0, echo=True, temperature=1.0, seed=5
    )

    first, second = completion.choices
    assert first.text.startswith(PROMPT) and second.text.startswith(PROMPT)
    num_prompt = completion.usage.prompt_tokens
    assert first.logprobs.token_logprobs[:num_prompt] == second.logprobs.token_logprobs[:num_prompt]
    assert len(second.logprobs.tokens) == num_prompt + 3


async def test_max_tokens_0_without_echo_is_still_refused(http_server):
    status, answer, _ = await post(
        f"{base_url(http_server)}/v1/completions", {"prompt": PROMPT, "max_tokens": 0}
    )

    assert status == 400
    assert_openai_error(answer, "invalid_argument", "max_tokens")
    assert "echo" in answer["error"]["message"]


# ---- continuous usage stats ----------------------------------------------------------------------


def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(client, model):
    chunks = list(
        client.completions.create(
            model=model, prompt=PROMPT, max_tokens=8, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True}, **GREEDY,
        )
    )  # fmt: skip

    *text_chunks, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 8
    prompt_tokens = last.usage.prompt_tokens
    counts = [c.usage.completion_tokens for c in text_chunks]
    assert all(c.usage.prompt_tokens == prompt_tokens for c in text_chunks)
    assert counts == sorted(counts) and counts[-1] == 8 and counts[0] >= 1
    assert all(c.usage.total_tokens == prompt_tokens + c.usage.completion_tokens for c in text_chunks)


def test_continuous_usage_stats_alone_adds_no_last_usage_chunk_in_a_chat(client, model):
    chunks = list(
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True,
            stream_options={"continuous_usage_stats": True}, **GREEDY,
        )
    )  # fmt: skip

    assert all(c.choices for c in chunks)
    assert chunks[0].usage.completion_tokens <= 1  # the role's chunk may come before any token
    assert chunks[-1].usage.completion_tokens == 5


async def test_continuous_usage_stats_must_be_a_boolean(http_server):
    body = {"prompt": PROMPT, "stream": True, "stream_options": {"continuous_usage_stats": "yes"}}

    status, answer, _ = await post(f"{base_url(http_server)}/v1/completions", body)

    assert status == 400
    assert_openai_error(answer, "invalid_argument", "stream_options.continuous_usage_stats")


# ---- logit bias ----------------------------------------------------------------------------------


def test_a_logit_bias_of_100_forces_its_token_on_both_fronts(client, model, stub, http_server):
    token_id = http_server.engine.tokenize(" Paris")[0]

    completion = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=4, logit_bias={str(token_id): 100}, logprobs=0, **GREEDY
    )
    response = stub.Generate(
        pb.GenerateRequest(
            prompt=PROMPT,
            sampling=pb.SamplingParameters(logit_bias={token_id: 100.0}),
            stopping=pb.StoppingCriteria(max_new_tokens=4, ignore_eos=True),
        ),
        timeout=30,
    )

    assert completion.choices[0].text == " Paris" * 4 == response.text
    assert [t.id for t in response.tokens] == [token_id] * 4


def test_the_python_client_sends_a_logit_bias(http_server):
    from client import TextGenClient

    token_id = http_server.engine.tokenize(" Paris")[0]

    with TextGenClient(http_server.target) as client:
        result = client.generate(PROMPT, max_new_tokens=3, ignore_eos=True, logit_bias={token_id: 100.0})

    assert [t.id for t in result.tokens] == [token_id] * 3


def test_a_logit_bias_of_minus_100_bans_the_greedy_token(client, model, stub):
    greedy = grpc_scored(stub, max_new_tokens=1).tokens[0]

    banned = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=1, logit_bias={str(greedy.id): -100}, logprobs=0, **GREEDY
    )

    assert banned.choices[0].logprobs.tokens != [greedy.text]
    assert banned.choices[0].logprobs.token_logprobs[0] < greedy.logprob  # the model's, not the biased


async def test_a_greedy_completion_is_the_same_beside_batchmates_with_a_logit_bias(http_server, model):
    async with openai.AsyncOpenAI(base_url=base_url(http_server) + "/v1", api_key="unused") as client:

        async def complete(**extra) -> str:
            completion = await client.completions.create(
                model=model, prompt=PROMPT, max_tokens=12, **GREEDY, **extra
            )
            return completion.choices[0].text

        alone = await complete()
        biased = [complete(logit_bias={str(i): 100}, seed=i) for i in range(100, 104)]
        together, *_ = await asyncio.gather(complete(), *biased)

    assert together == alone


BAD_LOGIT_BIAS = {
    "not an object": ([5], "logit_bias"),
    "a key that is no token id": ({"x": 1}, "logit_bias"),
    "a negative key": ({"-3": 1}, "logit_bias"),
    "a bias that is no number": ({"5": "high"}, "logit_bias[5]"),
    "a token id past the vocabulary": ({"1000000": 1}, "logit_bias[1000000]"),
    "a bias over 100": ({"5": 100.5}, "logit_bias[5]"),
    "a bias past any float": ({"5": 10**400}, "logit_bias[5]"),
    "over 300 tokens": ({str(i): 1 for i in range(301)}, "logit_bias"),
}


@pytest.mark.parametrize("logit_bias, param", BAD_LOGIT_BIAS.values(), ids=BAD_LOGIT_BIAS.keys())
async def test_a_bad_logit_bias_is_400_naming_it(http_server, logit_bias, param):
    body = {"messages": [{"role": "user", "content": "Hi"}], "logit_bias": logit_bias}

    status, answer, _ = await post(f"{base_url(http_server)}/v1/chat/completions", body)

    assert status == 400
    assert_openai_error(answer, "invalid_argument", param)


def test_a_grpc_logit_bias_past_the_vocabulary_is_invalid_argument(stub):
    import grpc

    request = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParameters(logit_bias={10**6: 1.0}))

    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, timeout=30)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.logit_bias[1000000]" in info.value.details()


# ---- /tokenize and /detokenize -------------------------------------------------------------------


async def test_tokenize_counts_the_prompt_as_a_completion_runs_it(http_server, client, model, stub):
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=1)
    ids = list(stub.Tokenize(pb.TokenizeRequest(text=PROMPT), timeout=30).ids)

    status, answer, _ = await post(f"{base_url(http_server)}/tokenize", {"model": model, "prompt": PROMPT})

    assert status == 200
    assert answer["tokens"] == ids
    assert answer["count"] == len(ids) == completion.usage.prompt_tokens
    assert answer["max_model_len"] == http_server.engine.model_info.max_context_len
    assert answer["token_strs"] is None


async def test_tokenize_renders_messages_as_a_chat_completion_runs_them(http_server, client, model):
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=1)

    status, answer, _ = await post(f"{base_url(http_server)}/tokenize", {"messages": messages})

    assert status == 200
    assert answer["count"] == chat.usage.prompt_tokens
    assert answer["tokens"] == http_server.engine.apply_chat_template(messages)


async def test_tokenize_returns_token_strings_when_asked(http_server):
    body = {"prompt": PROMPT, "return_token_strs": True}

    _, answer, _ = await post(f"{base_url(http_server)}/tokenize", body)

    tokenizer = http_server.engine.tokenizer
    assert answer["token_strs"] == tokenizer.convert_ids_to_tokens(answer["tokens"])
    assert tokenizer.convert_tokens_to_string(answer["token_strs"]) == PROMPT


async def test_detokenize_gives_back_the_tokenized_text(http_server):
    _, tokenized, _ = await post(f"{base_url(http_server)}/tokenize", {"prompt": PROMPT})

    status, answer, _ = await post(f"{base_url(http_server)}/detokenize", {"tokens": tokenized["tokens"]})

    assert status == 200
    assert answer == {"prompt": PROMPT}


BAD_TOKENIZE = {
    "neither prompt nor messages": ("tokenize", {}, "prompt"),
    "both prompt and messages": (
        "tokenize",
        {"prompt": "a", "messages": [{"role": "user", "content": "a"}]},
        "prompt",
    ),
    "token ids as the prompt": ("tokenize", {"prompt": [1, 2]}, "prompt"),
    "a message without a role": ("tokenize", {"messages": [{"content": "a"}]}, "messages[0].role"),
    "no generation prompt": (
        "tokenize",
        {"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": False},
        "add_generation_prompt",
    ),
    "an unknown parameter": ("tokenize", {"prompt": "a", "truncate": 3}, "truncate"),
    "no tokens": ("detokenize", {}, "tokens"),
    "a token id past the vocabulary": ("detokenize", {"tokens": [1, 10**6]}, "tokens[1]"),
    "a token that is no integer": ("detokenize", {"tokens": [1, True]}, "tokens"),
}


@pytest.mark.parametrize("path, body, param", BAD_TOKENIZE.values(), ids=BAD_TOKENIZE.keys())
async def test_a_bad_tokenize_or_detokenize_body_is_400_naming_the_parameter(http_server, path, body, param):
    status, answer, _ = await post(f"{base_url(http_server)}/{path}", body)

    assert status == 400
    assert_openai_error(answer, "invalid_argument", param)


@pytest.mark.parametrize("path, body", [("tokenize", {"prompt": "a"}), ("detokenize", {"tokens": [1]})])
async def test_tokenize_and_detokenize_for_another_model_are_404(http_server, path, body):
    status, answer, _ = await post(f"{base_url(http_server)}/{path}", {**body, "model": "gpt-5"})

    assert status == 404
    assert_openai_error(answer, "model_not_found", "model")
