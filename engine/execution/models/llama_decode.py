"""Decode steps of a `LlamaModel` on quantized weights: one C call per decoder layer.

A decode step of a small model is mostly fixed cost when it runs as torch ops (a few dozen calls per
layer); `decode_layer` (engine/execution/csrc/quantized.c) does a whole layer in one call, reading the paged
KV cache and the block-quantized weights in place. Prefill steps stay on the torch path, whose linear
layers call the same quantized matmul.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from engine.execution import quantized
from engine.execution.attention import StepContext


class QuantizedDecode:
    """Runs decode steps of `model` (whose linear layers are all `DualLinear`) through the C layer."""

    def __init__(self, model) -> None:
        self.model = model
        self.library = quantized.load()
        first = model.layers[0]
        self.shape = quantized.Shape(
            hidden=model.embed.shape[1],
            heads=model.num_heads,
            kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
            intermediate=first.down.decode.k,
            eps=model.eps,
            scale=model.scaling,
        )
        self.layers = [
            quantized.Layer(
                layer.input_norm.data_ptr(),
                layer.post_norm.data_ptr(),
                layer.qkv.decode.matrix,
                layer.o.decode.matrix,
                layer.gate_up.decode.matrix,
                layer.down.decode.matrix,
            )
            for layer in model.layers
        ]

    @staticmethod
    def supports(model) -> bool:
        linears = [model.lm_head, *(getattr(layer, name) for layer in model.layers for name in _LINEARS)]
        return all(isinstance(linear, quantized.DualLinear) for linear in linears) and (
            model.embed.device.type == "cpu" and model.embed.dtype == torch.float32
        )

    def __call__(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext, logit_rows: torch.Tensor
    ) -> torch.Tensor:
        model, shape = self.model, self.shape
        rows = token_ids.shape[0]
        x = F.embedding(token_ids, model.embed)
        cos, sin = model.rope(positions)
        cache = ctx.kv_cache.data  # [2, layers, kv_heads, slots, head_dim], contiguous
        layer_bytes = cache[0, 0].numel() * cache.element_size()
        keys, values = cache[0].data_ptr(), cache[1].data_ptr()
        step = quantized.Step(
            slots=ctx.slot_mapping.data_ptr(),
            tables=ctx.block_tables.data_ptr(),
            lens=ctx.context_lens.data_ptr(),
            num_slots=cache.shape[3],
            width=ctx.block_tables.shape[1],
            block_size=ctx.kv_cache.block_size,
            cos=cos.data_ptr(),
            sin=sin.data_ptr(),
        )
        q_size = shape.heads * shape.head_dim
        buffers = [
            torch.empty(rows, size)
            for size in (shape.hidden, q_size + 2 * shape.kv_heads * shape.head_dim, q_size, q_size)
        ]
        buffers.append(torch.empty(rows, 2 * shape.intermediate))
        scratch = quantized.Scratch(*(buffer.data_ptr() for buffer in buffers))
        refs = [ctypes.byref(shape), ctypes.byref(step), ctypes.byref(scratch)]
        for index, layer in enumerate(self.layers):
            step.k_cache, step.v_cache = keys + index * layer_bytes, values + index * layer_bytes
            if self.library.decode_layer(x.data_ptr(), rows, ctypes.byref(layer), *refs) != 0:
                raise MemoryError("the quantized decode layer could not allocate its buffers")
        return model.lm_head.decode(model.final_norm(x.index_select(0, logit_rows)))


_LINEARS = ("qkv", "o", "gate_up", "down")
