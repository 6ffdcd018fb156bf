"""The offline baseline: the same requests through transformers' own `generate`, in static batches.

A static batch is left-padded to its longest prompt and decodes until its longest output is done
(`min_new_tokens = max_new_tokens`), because that is what a static batch really computes; only each
request's own requested tokens count as useful output.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.execution.loader import default_model_dir, resolve_device, resolve_dtype


@dataclass(slots=True)
class OfflineResult:
    """Work done and time taken by one offline run over a list of requests."""

    duration_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    computed_output_tokens: int

    @property
    def request_throughput(self) -> float:
        return self.num_requests / self.duration_s

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s

    def to_dict(self) -> dict:
        return {
            "duration_s": self.duration_s,
            "num_requests": self.num_requests,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "computed_output_tokens": self.computed_output_tokens,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
        }


def left_padded_batch(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` for `prompts`, padded on the left to the longest one."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.inference_mode()
def generate_static_batch(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], num_new_tokens: int, pad_token_id: int
) -> torch.Tensor:
    """Greedy `generate` of exactly `num_new_tokens` for every prompt; returns only the new token ids."""
    input_ids, attention_mask = left_padded_batch(prompts, pad_token_id, model.device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=num_new_tokens,
        min_new_tokens=num_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    new_tokens = output[:, input_ids.shape[1] :]
    assert new_tokens.shape == (len(prompts), num_new_tokens), f"generate returned {tuple(new_tokens.shape)}"
    return new_tokens


def run_static_batches(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    output_lens: Sequence[int],
    batch_size: int,
    pad_token_id: int,
) -> OfflineResult:
    """Run the requests in arrival order, `batch_size` at a time, and time the whole run."""
    assert len(prompts) == len(output_lens) and batch_size > 0
    computed = 0
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch_prompts = prompts[first : first + batch_size]
        longest = max(output_lens[first : first + batch_size])
        generate_static_batch(model, batch_prompts, longest, pad_token_id)
        computed += longest * len(batch_prompts)
    duration = time.perf_counter() - start
    return OfflineResult(
        duration_s=duration,
        num_requests=len(prompts),
        prompt_tokens=sum(len(p) for p in prompts),
        output_tokens=sum(output_lens),
        computed_output_tokens=computed,
    )


def pad_token_id_of(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS token (masked out by the attention mask either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    assert pad is not None, "the tokenizer has neither a pad nor an EOS token"
    return pad


def load_hf_model(model: str | None = None, device: str = "auto", dtype: str = "auto"):
    """The model and tokenizer textgen serves, loaded as plain transformers (its own attention)."""
    path = default_model_dir() if model is None else model
    resolved_device = resolve_device(device)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, resolved_device))
    return hf_model.to(resolved_device).eval(), AutoTokenizer.from_pretrained(path)
