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
from engine.execution.packed_linear import (
    Fp16LinearFactory,
    fbgemm_available,
    fp16_cache_version,
    fp16_gemm_library,
    fp16_packed_linear,
    pack_linear_layers,
)
from engine.execution.quantized import DualLinear, QuantizedLinearFactory, block_cache_path
from engine.execution.weight_cache import WeightCache, cache_path, parameter_names

MODEL_IMPLS = ("auto", "lean", "transformers")


def _fp16_packed(parts: list[torch.Tensor], bias: torch.Tensor | None, head: bool = False) -> llama.Linear:
    return fp16_packed_linear(torch.cat(parts) if len(parts) > 1 else parts[0], bias)


def _fp16_factory(hf_model, cache: WeightCache) -> llama.LinearFactory:
    """FBGEMM's float16 GEMM on layouts from `cache` where the fp16_gemm kernel runs, else packed by torch."""
    if fp16_gemm_library() is None:
        return _fp16_packed
    return Fp16LinearFactory(parameter_names(hf_model), cache)


def _fp16_cache(checkpoint: Path | None) -> WeightCache:
    """Where the float16 layouts of `checkpoint`'s weights are cached (nowhere without the kernel)."""
    if checkpoint is None or fp16_gemm_library() is None:
        return WeightCache(None)
    return WeightCache(cache_path(checkpoint, "fp16", fp16_cache_version()))


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


def _dual_linear_factory(
    quantized: QuantizedLinearFactory, prefill: llama.LinearFactory | None
) -> llama.LinearFactory:
    """q4_1: blocks for decode steps, and for prefill `prefill` (FBGEMM's float16 GEMM) where there is one."""

    def make(parts: list[torch.Tensor], bias: torch.Tensor | None, head: bool = False) -> DualLinear:
        decode = quantized(parts, bias, head)
        return DualLinear(prefill(parts, bias) if prefill else decode, decode)

    return make


def build_forward(
    hf_model, impl: str, weight_format: str, gguf_path: Path | None = None, checkpoint: Path | None = None
) -> tuple[str, ModelForward]:
    """The forward for `impl` ("auto": lean where the architecture is supported) as (resolved impl, forward).

    With "fp16-packed" weights every linear layer runs on FBGEMM's float16 GEMM; with "q4_1" on blocks
    taken from `gguf_path` or quantized, with FBGEMM for prefill. The lean model's q4_1 blocks and float16
    layouts are made once for the checkpoint directory `checkpoint` and cached (`weight_cache`).
    The lean model takes over the decoder layers' weights: transformers' copies of them are dropped.
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
    blocks = WeightCache(None if checkpoint is None else block_cache_path(checkpoint))
    layouts = _fp16_cache(checkpoint) if weight_format in ("q4_1", "fp16-packed") else WeightCache(None)
    if weight_format == "q4_1":
        prefill = _fp16_factory(hf_model, layouts) if fbgemm_available() else None
        make_linear = _dual_linear_factory(QuantizedLinearFactory(hf_model, gguf_path, blocks), prefill)
    elif weight_format == "fp16-packed":
        make_linear = _fp16_factory(hf_model, layouts)
    else:
        make_linear = llama.plain_linear
    model = llama.LlamaModel(hf_model, make_linear)
    blocks.save()
    layouts.save()
    hf_model.model.layers = torch.nn.ModuleList()  # the lean model holds every weight it needs
    return "lean", model
