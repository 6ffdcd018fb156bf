"""The Triton decode kernel compiles to cubins for sm_80 and sm_90 without a GPU (bench.gpu.triton_aot)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from bench.gpu.triton_aot import ARCHS, GROUPS, HEAD_DIMS, Variant, compile_all  # noqa: E402


def test_the_decode_kernel_compiles_for_every_target_gpu_head_dim_and_gqa_group():
    reports = compile_all()
    compiled = {(r.variant.arch, r.variant.head_dim, r.variant.group) for r in reports}
    assert compiled == {(a, d, g) for a in ARCHS for d in HEAD_DIMS for g in GROUPS}
    for report in reports:
        assert report.cubin_bytes > 0
        assert 0 < report.registers <= 255, report
        # ptxas is deterministic: the README's table says no variant spills, and this keeps it so.
        assert report.spill_stores == report.spill_loads == 0, report


@triton.jit
def _broken_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, scale,
                   stride_qb, stride_qh, stride_kh, stride_ks, stride_tb, stride_ob, stride_oh,
                   GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HEAD_DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr):  # fmt: skip
    tl.store(out_ptr + tl.arange(0, HEAD_DIM + 1), 0.0)  # not a power of two: refused


def test_a_kernel_that_does_not_compile_fails_the_check():
    with pytest.raises(triton.CompilationError, match="power of 2"):
        compile_all([Variant(90, 64, 1)], kernel=f"{__name__}:_broken_kernel", workers=1)
