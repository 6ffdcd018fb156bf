"""Lean model code for the Llama family (Llama, Mistral, Qwen2): one function per step, no module tree.

The same arithmetic as transformers' modeling of these architectures, with what a serving step does not
need taken out: the query, key and value projections are one matrix, so are the gate and up projections,
RoPE reads a cos/sin table built once, and the final norm and the output head run only on the rows whose
logits the step returns. A step through transformers' modules spends most of a small batch's time in
Python dispatch (README, "Where the time goes"); this one makes a few dozen calls per layer fewer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.execution.attention import StepContext, attend
from engine.execution.models.llama_decode import QuantizedDecode

Linear = Callable[[torch.Tensor], torch.Tensor]
# (weights whose rows are stacked into one matrix, bias, whether it is the output head) -> the layer
LinearFactory = Callable[..., Linear]

ARCHITECTURES = ("llama", "mistral", "qwen2")


def supports(hf_model) -> bool:
    """Whether `hf_model` is a Llama-family decoder this module can run as it is."""
    return supports_config(hf_model.config)


def supports_config(config) -> bool:
    """Whether a model of this transformers config is a Llama-family decoder this module can run as it is."""
    return (
        getattr(config, "model_type", None) in ARCHITECTURES
        and getattr(config, "hidden_act", None) == "silu"
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "rope_parameters", {}).get("rope_type", "default") == "default"
    )


def plain_linear(parts: list[torch.Tensor], bias: torch.Tensor | None, head: bool = False) -> Linear:
    weight = torch.cat(parts) if len(parts) > 1 else parts[0]
    return lambda x: F.linear(x, weight, bias)


@dataclass(slots=True)
class _Layer:
    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaModel:
    """Runs a step's packed tokens through a Llama-family model's weights, with paged attention."""

    def __init__(self, hf_model, make_linear: LinearFactory = plain_linear) -> None:
        config = hf_model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.scaling = self.head_dim**-0.5
        decoder = hf_model.model
        self.embed = decoder.embed_tokens.weight
        self.layers = [_layer(layer, make_linear) for layer in decoder.layers]
        self.norm = decoder.norm.weight
        self.lm_head = make_linear([hf_model.lm_head.weight], None, head=True)
        rotary = decoder.rotary_emb
        self._inv_freq = rotary.inv_freq.float()
        self._rope_scaling = float(rotary.attention_scaling)
        self._cos = self._sin = torch.empty(0, self.head_dim, device=self.embed.device)
        self._rope_complete = False
        self._decode = QuantizedDecode(self) if QuantizedDecode.supports(self) else None

    def __call__(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext, logit_rows: torch.Tensor
    ) -> torch.Tensor:
        """token_ids, positions [tokens] -> logits [len(logit_rows), vocab]."""
        if self._decode is not None and not ctx.is_prefill:
            return self._decode(token_ids, positions, ctx, logit_rows)
        cos, sin = self.rope(positions)
        hidden = F.embedding(token_ids, self.embed)
        for index, layer in enumerate(self.layers):
            normed = _rms_norm(hidden, layer.input_norm, self.eps)
            hidden = hidden + self._attention(layer, index, normed, cos, sin, ctx)
            hidden = hidden + self._mlp(layer, _rms_norm(hidden, layer.post_norm, self.eps))
        return self.lm_head(self.final_norm(hidden.index_select(0, logit_rows)))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return _rms_norm(hidden, self.norm, self.eps)

    def _attention(
        self,
        layer: _Layer,
        index: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: StepContext,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = layer.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = _apply_rope(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
        k = _apply_rope(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        out = attend(ctx, index, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), self.scaling)
        return layer.o(out.reshape(tokens, q_size))

    @staticmethod
    def _mlp(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = layer.gate_up(x).chunk(2, dim=-1)
        return layer.down(F.silu(gate) * up)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [tokens, 1, head_dim] (contiguous) at `positions`, from a table grown as needed."""
        if not self._rope_complete:
            needed = int(positions.max()) + 1
            if needed > self._cos.shape[0]:
                self._grow_rope(max(needed, 2 * self._cos.shape[0], 256))
        return self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)

    def complete_rope(self, max_positions: int) -> None:
        """Build the table for every position below `max_positions` now: `rope` then never reads the
        positions on the host, which a CUDA graph being captured cannot do."""
        self._grow_rope(max(max_positions, self._cos.shape[0]))
        self._rope_complete = True

    def _grow_rope(self, size: int) -> None:
        steps = torch.arange(size, device=self._inv_freq.device, dtype=torch.float32)
        freqs = steps[:, None] * self._inv_freq[None, :]  # as transformers: one product each, in float32
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.embed.dtype
        self._cos = (emb.cos() * self._rope_scaling).to(dtype)
        self._sin = (emb.sin() * self._rope_scaling).to(dtype)


def _layer(layer, make_linear: LinearFactory) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    qkv_bias = None
    if attn.q_proj.bias is not None:
        qkv_bias = torch.cat([p.bias for p in projections])
    return _Layer(
        input_norm=layer.input_layernorm.weight,
        qkv=make_linear([p.weight for p in projections], qkv_bias),
        o=make_linear([attn.o_proj.weight], attn.o_proj.bias),
        post_norm=layer.post_attention_layernorm.weight,
        gate_up=make_linear([mlp.gate_proj.weight, mlp.up_proj.weight], None),
        down=make_linear([mlp.down_proj.weight], None),
    )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers' LlamaRMSNorm: in float32, then back to the input's dtype before the weight."""
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
