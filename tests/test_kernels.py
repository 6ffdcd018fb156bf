"""The C kernels' build: compiled for this CPU where there is a compiler, a prebuilt baseline where not."""

from __future__ import annotations

import ctypes
import platform

import pytest
import torch

from engine.execution import kernels, quantized
from engine.execution.quantized import Q4_1, QuantizedLinear, quantize

pytestmark = pytest.mark.skipif(
    kernels.compiler() is None or platform.machine() != "x86_64", reason="needs a C compiler on x86-64"
)


def test_without_a_compiler_the_prebuilt_baseline_kernels_are_used(tmp_path, monkeypatch):
    built = kernels.prebuild(tmp_path / "prebuilt")
    assert sorted(p.name for p in built) == ["fp16_gemm.so", "paged_attention.so", "quantized.so"]
    monkeypatch.setattr(kernels, "compiler", lambda cplusplus=False: None)
    monkeypatch.setenv(kernels.PREBUILT_ENV, str(tmp_path / "prebuilt"))
    assert kernels.build("quantized") == tmp_path / "prebuilt" / "quantized.so"
    # The baseline build (AVX2) computes the same bits as this machine's own.
    baseline = ctypes.CDLL(str(kernels.build("quantized")))
    quantized._declare(baseline)
    layer = QuantizedLinear.from_blocks(quantize(torch.randn(45, 576) * 0.05, Q4_1), None, 45, 576, Q4_1)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(4))
    native = layer(x)
    layer.library = baseline
    assert torch.equal(layer(x), native)


def test_without_a_compiler_or_prebuilt_kernels_the_build_says_why(monkeypatch):
    monkeypatch.setattr(kernels, "compiler", lambda cplusplus=False: None)
    monkeypatch.delenv(kernels.PREBUILT_ENV, raising=False)
    with pytest.raises(RuntimeError, match="TEXTGEN_PREBUILT_KERNELS"):
        kernels.build("quantized")
