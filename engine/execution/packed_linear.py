"""CPU linear layers with weights packed as float16 for FBGEMM; activations and sums stay float32.

On the CPU the model's matmuls are most of a step, and at decode batch sizes they are bound by reading
the weights. FBGEMM's float16 GEMM reads half the bytes of a float32 weight and widens them to float32
in registers, so the arithmetic is float32 throughout and only the weights are rounded (to float16,
relative error <= 2^-11). On the AVX2 CPU this project is measured on it is also a better-blocked kernel
than MKL's float32 one, and greedy outputs of the test prompts stay token for token those of float32
(README, "CPU dtype, weights and attention", has the timings).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.execution import kernels

Linear = Callable[[torch.Tensor], torch.Tensor]

WEIGHT_FORMATS = ("auto", "native", "fp16-packed", "q4_1")


def fbgemm_available() -> bool:
    """FBGEMM is x86-only; other CPUs keep the model's own linear layers."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def avx2_available() -> bool:
    """What the q4_1 kernels (engine/execution/csrc/quantized.c) are written for."""
    flags = kernels.cpu_signature().split()
    return all(flag in flags for flag in ("avx2", "fma", "f16c"))


def resolve_weight_format(
    weight_format: str, device: torch.device, dtype: torch.dtype, llama_family: bool = False
) -> str:
    """'auto', for float32 models on the CPU: q4_1 for a Llama-family model that runs on the lean model code
    (a GGUF's own blocks, or weights quantized once and cached: a quarter of float16's bytes) where the
    kernels can run, else fp16-packed where FBGEMM is there; native everywhere else."""
    if weight_format not in WEIGHT_FORMATS:
        choices = ", ".join(WEIGHT_FORMATS)
        raise ValueError(f"unknown weight format {weight_format!r}; choose one of {choices}")
    cpu_float32 = device.type == "cpu" and dtype == torch.float32
    if weight_format == "auto":
        if cpu_float32 and llama_family and avx2_available():
            return "q4_1"
        return "fp16-packed" if cpu_float32 and fbgemm_available() else "native"
    if weight_format == "q4_1" and not (cpu_float32 and avx2_available()):
        raise ValueError("q4_1 weights are for float32 models on an x86 CPU with AVX2, FMA and F16C")
    if weight_format == "fp16-packed":
        if device.type != "cpu" or dtype != torch.float32:
            raise ValueError("fp16-packed weights are for float32 models on the CPU")
        if not fbgemm_available():
            raise ValueError("fp16-packed weights need FBGEMM (an x86 CPU build of torch)")
    return weight_format


def fp16_packed_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    """`F.linear(x, weight, bias)` on FBGEMM's float16-packed GEMM, the weight packed once here."""
    out_features, in_features = weight.shape
    bias = None if bias is None else bias.detach().float().contiguous()
    packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), bias)

    def linear(x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, in_features), packed)
        return out.view(*x.shape[:-1], out_features)

    return linear


class PackedFp16Linear(nn.Module):
    """`nn.Linear` with its weight packed once for `torch.ops.quantized.linear_dynamic_fp16`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._linear = fp16_packed_linear(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=fp16-packed"


def pack_linear_layers(model: nn.Module) -> int:
    """Replace every `nn.Linear` in `model` (the output head included) by a `PackedFp16Linear`.

    A head tied to the input embeddings gets its own packed copy; the embedding keeps its float32
    table for lookups. Returns the number of layers replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedFp16Linear(child))
                replaced += 1
    return replaced
