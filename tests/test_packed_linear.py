"""FBGEMM float16-packed linear layers: same math as float32 with float16-rounded weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.execution.packed_linear import (
    PackedFp16Linear,
    avx2_available,
    fbgemm_available,
    pack_linear_layers,
    resolve_weight_format,
)

needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="FBGEMM is x86-only")


@needs_fbgemm
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("leading", [(1,), (5,), (2, 7)])
def test_packed_linear_matches_float32_with_rounded_weights(bias: bool, leading: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    x = torch.randn(*leading, 96)
    out = PackedFp16Linear(linear)(x)
    assert out.shape == (*leading, 40)
    rounded = F.linear(x, linear.weight.half().float(), linear.bias)
    torch.testing.assert_close(out, rounded, rtol=1e-5, atol=1e-5)
    # and close to the float32 layer: only the weights were rounded, to float16's 11-bit mantissa
    torch.testing.assert_close(out, linear(x), rtol=2e-3, atol=2e-3)
    assert not torch.equal(out, linear(x))  # the weights really are float16, not a float32 fallback


@needs_fbgemm
def test_pack_linear_layers_replaces_every_linear_and_keeps_embeddings() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 10)))
    ids = torch.tensor([[1, 2, 3]])
    before = model(ids)
    assert pack_linear_layers(model) == 2
    assert [type(m) for m in model.modules()].count(PackedFp16Linear) == 2
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model[0], nn.Embedding) and model[0].weight.dtype == torch.float32
    torch.testing.assert_close(model(ids), before, rtol=2e-3, atol=2e-3)


def test_resolve_weight_format() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    expected = "fp16-packed" if fbgemm_available() else "native"
    assert resolve_weight_format("auto", cpu, torch.float32) == expected
    assert resolve_weight_format("auto", cpu, torch.bfloat16) == "native"
    assert resolve_weight_format("auto", cuda, torch.bfloat16) == "native"
    assert resolve_weight_format("native", cpu, torch.float32) == "native"
    # Llama-family models on the lean code: q4_1 on a float32 CPU with AVX2, nowhere else.
    llama_cpu = "q4_1" if avx2_available() else expected
    assert resolve_weight_format("auto", cpu, torch.float32, llama_family=True) == llama_cpu
    assert resolve_weight_format("auto", cpu, torch.bfloat16, llama_family=True) == "native"
    assert resolve_weight_format("auto", cuda, torch.float32, llama_family=True) == "native"
    with pytest.raises(ValueError, match="unknown weight format"):
        resolve_weight_format("int4", cpu, torch.float32)
    with pytest.raises(ValueError, match="float32 models on the CPU"):
        resolve_weight_format("fp16-packed", cuda, torch.float32)
    with pytest.raises(ValueError, match="float32 models on the CPU"):
        resolve_weight_format("fp16-packed", cpu, torch.bfloat16)
