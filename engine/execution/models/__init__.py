"""How a step's packed tokens go through the model: lean code for the Llama family, transformers otherwise.

Both take the same inputs (token ids and positions of every token of the step, the step's attention
context, the rows whose logits to return) and give the same logits up to float rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from engine.execution import attention
from engine.execution.attention import StepContext
from engine.execution.models import llama
from engine.execution.packed_linear import fbgemm_available, fp16_packed_linear, pack_linear_layers
from engine.execution.quantized import DualLinear, QuantizedLinearFactory

MODEL_IMPLS = ("auto", "lean", "transformers")


def _fp16_packed(parts: list[torch.Tensor], bias: torch.Tensor | None, head: bool = False) -> llama.Linear:
    return fp16_packed_linear(torch.cat(parts) if len(parts) > 1 else parts[0], bias)


class ModelForward(Protocol):
    def __call__(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext, logit_rows: torch.Tensor
    ) -> torch.Tensor: ...


class TransformersForward:
    """transformers' own modeling, with paged attention plugged in through its attention interface."""

    def __init__(self, hf_model) -> None:
        self.hf_model = hf_model

    def __call__(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext, logit_rows: torch.Tensor
    ) -> torch.Tensor:
        attention.set_context(ctx)
        try:
            out = self.hf_model(
                input_ids=token_ids[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=logit_rows,
            )
        finally:
            attention.set_context(None)
        return out.logits[0]


def _dual_linear_factory(quantized: QuantizedLinearFactory) -> llama.LinearFactory:
    """q4_1: blocks for decode steps, and for prefill FBGEMM's float16 GEMM where there is one."""
    prefill = _fp16_packed if fbgemm_available() else None

    def make(parts: list[torch.Tensor], bias: torch.Tensor | None, head: bool = False) -> DualLinear:
        decode = quantized(parts, bias, head)
        return DualLinear(prefill(parts, bias) if prefill else decode, decode)

    return make


def build_forward(
    hf_model, impl: str, weight_format: str, gguf_path: Path | None = None, block_cache: Path | None = None
) -> tuple[str, ModelForward]:
    """The forward for `impl` ("auto": lean where the architecture is supported) as (resolved impl, forward).

    With "fp16-packed" weights every linear layer runs on FBGEMM's float16 GEMM; with "q4_1" on blocks
    taken from `gguf_path` or quantized, and kept in (or read from) the file `block_cache`. The lean model
    takes over the decoder layers' weights: transformers' copies of them are dropped.
    """
    if impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}, not {impl!r}")
    supported = llama.supports(hf_model)
    if impl == "lean" and not supported:
        model_type = hf_model.config.model_type
        raise ValueError(f"no lean model code for {model_type!r}; use model_impl 'transformers'")
    if weight_format == "q4_1" and (impl == "transformers" or not supported):
        raise ValueError(
            "q4_1 weights need the lean model code (a Llama-family model, model_impl auto or lean)"
        )
    if impl == "transformers" or not supported:
        if weight_format == "fp16-packed":
            pack_linear_layers(hf_model)
        return "transformers", TransformersForward(hf_model)
    quantized = QuantizedLinearFactory(hf_model, gguf_path, block_cache) if weight_format == "q4_1" else None
    if quantized is not None:
        make_linear = _dual_linear_factory(quantized)
    else:
        make_linear = {"fp16-packed": _fp16_packed, "native": llama.plain_linear}[weight_format]
    model = llama.LlamaModel(hf_model, make_linear)
    if quantized is not None:
        quantized.save_cache()
    hf_model.model.layers = torch.nn.ModuleList()  # the lean model holds every weight it needs
    return "lean", model
