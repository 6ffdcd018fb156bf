"""vLLM's `/tokenize` and `/detokenize` bodies in and answers out.

`/tokenize` takes a `prompt` (text) or `messages` (a chat, checked by the chat endpoint's own rules and
rendered by the same template), and answers the token ids the generation endpoints would run: `count`,
`max_model_len`, `tokens` and, with `return_token_strs`, each token's string. `/detokenize` takes `tokens`
and answers their text as `prompt`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.frontend.admission import Prompt, check_input_size, renamed
from engine.frontend.limits import RequestLimits
from service.openai.request import CHAT, COMPLETION, OpenAIRequest, parse_request
from service.status import InvalidArgument

_TOKENIZE_PARAMETERS = {
    "model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs",
}  # fmt: skip
_DETOKENIZE_PARAMETERS = {"model", "tokens"}


@dataclass(slots=True)
class TokenizeRequest:
    """What a `/tokenize` body asks: its input as the generation endpoints parse it (`input.prompt` or
    `input.messages`), whether to add the tokenizer's special tokens to a prompt, and whether to answer each
    token's string."""

    input: OpenAIRequest
    add_special_tokens: bool = False
    return_token_strs: bool = False

    def prompt(self) -> Prompt:
        """The input as admission tokenizes or renders it (engine/frontend/admission.py `prompt_ids`)."""
        return replace(self.input.prompt_input(), add_special_tokens=self.add_special_tokens)


@dataclass(slots=True)
class DetokenizeRequest:
    """What a `/detokenize` body asks: the text of `tokens`."""

    model: str | None
    tokens: list[int]


def parse_tokenize(body: object, limits: RequestLimits) -> TokenizeRequest:
    """The request of a `/tokenize` body; raises `InvalidArgument` naming every bad parameter.

    A prompt's ids are those `/v1/completions` runs: without special tokens unless `add_special_tokens` is
    true (vLLM's default is true: textgen's completions add none). A chat's are those `/v1/chat/completions`
    runs: rendered ready for the assistant's reply, so `add_generation_prompt` can only be true and
    `add_special_tokens` only false.
    """
    body = _object(body, _TOKENIZE_PARAMETERS)
    violations = []
    if ("prompt" in body) == ("messages" in body):
        violations.append(("prompt", "exactly one of prompt or messages is required"))
    elif "prompt" in body and not isinstance(body["prompt"], str):
        violations.append(("prompt", "must be a string"))
    flags = {}
    for name in ("add_special_tokens", "add_generation_prompt", "return_token_strs"):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            violations.append((name, "must be true or false"))
        flags[name] = value
    if "messages" in body:
        if flags["add_generation_prompt"] is False:
            violations.append(("add_generation_prompt", "must be true: a chat is rendered for the reply"))
        if flags["add_special_tokens"]:
            violations.append(("add_special_tokens", "must be false with messages: the template adds them"))
    elif flags["add_generation_prompt"] is not None:
        violations.append(("add_generation_prompt", "is only allowed with messages"))
    if violations:
        raise InvalidArgument(violations)
    kind = CHAT if "messages" in body else COMPLETION
    given = {name: body[name] for name in ("model", "prompt", "messages") if name in body}
    generation = parse_request(kind, given, limits)
    request = TokenizeRequest(
        generation,
        add_special_tokens=flags["add_special_tokens"] is True,
        return_token_strs=flags["return_token_strs"] is True,
    )
    with renamed(generation.param):
        check_input_size(request.prompt(), limits)  # first, for that alone, as the generation endpoints do
    if generation.refusals:
        raise InvalidArgument(generation.refusals)
    return request


def parse_detokenize(body: object, limits: RequestLimits) -> DetokenizeRequest:
    """The request of a `/detokenize` body: at most a context's worth of token ids, each in the vocabulary."""
    body = _object(body, _DETOKENIZE_PARAMETERS)
    model, tokens = body.get("model"), body.get("tokens")
    violations = []
    if model is not None and not isinstance(model, str):
        violations.append(("model", "must be a string"))
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):  # JSON true is not an id
        violations.append(("tokens", "must be a list of token ids"))
    elif len(tokens) > limits.max_context_len:
        violations.append(("tokens", f"at most {limits.max_context_len} tokens allowed, got {len(tokens)}"))
    else:
        vocab = limits.vocab_size
        bad = next((i for i, t in enumerate(tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            violations.append((f"tokens[{bad}]", f"must be a token id in [0, {vocab}), got {tokens[bad]}"))
    if violations:
        raise InvalidArgument(violations)
    return DetokenizeRequest(model, tokens)


def tokenize_response(ids: list[int], max_model_len: int, token_strs: list[str] | None) -> dict:
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": token_strs}


def _object(body: object, parameters: set[str]) -> dict:
    if not isinstance(body, dict):
        raise InvalidArgument([("body", "must be a JSON object")])
    unknown = sorted(set(body) - parameters)
    if unknown:
        raise InvalidArgument([(name, "is not a parameter this server supports") for name in unknown])
    return {name: value for name, value in body.items() if value is not None}  # null is left out
