"""Batched sampling on the logits' device: penalties, logit bias, temperature, top-k, top-p, min-p, seeds,
greedy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import SamplingParams

FAILED = -1  # the token id of a row that could not be sampled (non-finite logits or probabilities)
_FLOAT_MAX = torch.finfo(torch.float32).max


@dataclass(slots=True)
class SamplingBatch:
    """One step's per-row sampling parameters, as tensors on the logits' device."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    history: list[list[int]]  # prompt + output ids per row (repetition penalty)
    outputs: list[list[int]]  # output ids per row (frequency and presence penalties)
    allowed: torch.Tensor | None = None  # bool [rows, vocab]: the tokens each row's grammar allows


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of `logits` [rows, vocab]; return (token ids, their model log-probabilities).

    Each row uses only its own parameters, its own generator and its own grammar mask (`batch.allowed`,
    applied after the penalties and the logit bias), so a seeded request draws the same tokens whatever else
    is in the batch. The log-probabilities are the model's: of the raw logits, before penalties, bias, mask
    and temperature.
    A row whose logits or probabilities are not finite, or whose mask allows nothing, gets the token id
    `FAILED` and a NaN log-probability; the other rows are sampled as usual.
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    params = batch.params
    failed = torch.isnan(logits).any(dim=-1)
    if any(_has_penalty(p) for p in params):
        logits = _apply_penalties(logits.clone(), batch)
    if any(p.logit_bias for p in params):
        logits = logits + _logit_bias(params, logits.shape, logits.device)
    if batch.allowed is not None:  # structured output; the reported log-probabilities stay the model's
        logits = logits.masked_fill(~batch.allowed, float("-inf"))
        failed |= ~batch.allowed.any(dim=-1)
    token_ids = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        probs = _filtered_probs(logits[rows], [params[i] for i in sampled_rows])
        usable = (torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)).tolist()
        for j, i in enumerate(sampled_rows):
            if usable[j]:
                token_ids[i] = torch.multinomial(probs[j], 1, generator=batch.generators[i])[0]
            else:
                failed[i] = True
    token_ids[failed] = FAILED
    chosen = logprobs.gather(1, token_ids.clamp(min=0)[:, None])[:, 0].masked_fill(failed, float("nan"))
    return token_ids, chosen


def top_logprobs(logits: torch.Tensor, ks: list[int]) -> list[list[tuple[int, float]]]:
    """The `ks[i]` (>= 1) most likely tokens of row i of `logits` as (id, log-probability), most likely first.

    The log-probabilities are those `sample` reports for the chosen token: the log-softmax of the raw logits.
    """
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(max(ks), dim=-1)
    rows = zip(ids.tolist(), values.tolist(), ks, strict=True)
    return [list(zip(i[:k], v[:k], strict=True)) for i, v, k in rows]


def prompt_logprobs(
    logits: torch.Tensor, targets: list[int], k: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row i of `logits`, the log-probability of `targets[i]` and the `k` most likely tokens (as
    `top_logprobs` gives them)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
    if k == 0:
        return [(value, []) for value in chosen]
    values, ids = logprobs.topk(k, dim=-1)
    tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return list(zip(chosen, tops, strict=True))


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    for i, p in enumerate(batch.params):
        if p.repetition_penalty != 1.0 and batch.history[i]:
            # As in transformers: scale seen tokens' logits towards "less likely" whatever their sign.
            seen = torch.tensor(sorted(set(batch.history[i])), device=logits.device)
            values = logits[i, seen]
            penalty = p.repetition_penalty
            penalized = torch.where(values > 0, values / penalty, values * penalty)
            logits[i, seen] = penalized.clamp(-_FLOAT_MAX, _FLOAT_MAX)  # a tiny penalty must not make inf
        if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and batch.outputs[i]:
            # As in OpenAI's API: subtract count * frequency + presence from tokens already generated.
            ids = torch.tensor(batch.outputs[i], device=logits.device)
            counts = torch.zeros(logits.shape[1], device=logits.device).index_add_(
                0, ids, torch.ones(len(ids), device=logits.device)
            )
            logits[i] -= counts * p.frequency_penalty + (counts > 0).float() * p.presence_penalty
    return logits


def _logit_bias(params: list[SamplingParams], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Each row's `logit_bias` as a [rows, vocab] tensor, zero elsewhere: added element by element, so a row's
    logits never depend on another row's bias."""
    rows, ids, values = [], [], []
    for i, p in enumerate(params):
        rows += [i] * len(p.logit_bias)
        ids += p.logit_bias.keys()
        values += p.logit_bias.values()
    bias = torch.zeros(shape, device=device)
    index = (torch.tensor(rows, device=device), torch.tensor(ids, dtype=torch.long, device=device))
    return bias.index_put_(index, torch.tensor(values, dtype=torch.float32, device=device))


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, each row with its own values; returns probabilities."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    # Shifted so the top logit is 0 before dividing: however small the temperature, nothing overflows.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        ranks = torch.arange(vocab, device=device)[None, :]
        remove = ranks >= top_k[:, None]
        sorted_probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays, even
        # for a top_p so small that it is 0 in float32.
        reached = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
        remove |= reached & (top_p < 1.0)[:, None] & (ranks > 0)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs
