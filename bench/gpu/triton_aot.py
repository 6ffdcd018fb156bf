"""The Triton decode kernel compiled ahead of time for the GPUs we target, on a machine without one.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs Triton's whole pipeline down to
a cubin with the `ptxas` bundled in the triton wheel, so a kernel that would not compile for sm_80
(A100) or sm_90 (H100 / H200) fails here, in `make test` (tests/test_triton_aot.py), not on a lent GPU.
Each variant is the kernel the engine launches for one shape: bfloat16 (CUDA's default dtype), KV block
size 16, a head dim and a GQA group (query heads per KV head), arguments specialized as Triton's JIT
specializes them (16-byte aligned pointers, strides that are multiples of the head dim).

`python -m bench.gpu.triton_aot` compiles every variant afresh (no cache) and prints ptxas's registers and
spills of each as a table (README, GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import multiprocessing
import os
import re
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

ARCHS = (80, 90)
HEAD_DIMS = (64, 128)
GROUPS = (1, 4, 8)
BLOCK_SIZE = 16


@dataclass(slots=True, frozen=True)
class Variant:
    """One compiled shape of the kernel."""

    arch: int  # compute capability, 80 = sm_80
    head_dim: int
    group: int  # query heads per KV head
    dtype: str = "bf16"  # Triton's name of the cache and query dtype


@dataclass(slots=True, frozen=True)
class KernelReport:
    """What ptxas said about one variant's cubin."""

    variant: Variant
    cubin_bytes: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_bytes: int


def variants() -> list[Variant]:
    """Every target: sm_80 and sm_90, head dims 64 and 128, GQA groups 1, 4 and 8."""
    return [Variant(a, d, g) for a, d, g in itertools.product(ARCHS, HEAD_DIMS, GROUPS)]


def _signature(variant: Variant) -> tuple[dict[str, str], dict[str, int], dict[tuple[int, ...], list]]:
    """The kernel's argument types, constexprs and the JIT's specialization attributes for `variant`."""
    pointers = {"q_ptr": f"*{variant.dtype}", "k_ptr": f"*{variant.dtype}", "v_ptr": f"*{variant.dtype}",
                "tables_ptr": "*i64", "lens_ptr": "*i64", "out_ptr": f"*{variant.dtype}"}  # fmt: skip
    strides = ("stride_qb", "stride_qh", "stride_kh", "stride_ks", "stride_tb", "stride_ob", "stride_oh")
    constexprs = {"GROUP": variant.group, "GROUP_P2": variant.group, "HEAD_DIM": variant.head_dim,
                  "HEAD_DIM_P2": variant.head_dim, "BLOCK_SIZE": BLOCK_SIZE}  # fmt: skip
    signature = {
        **pointers,
        "scale": "fp32",
        **dict.fromkeys(strides, "i32"),
        **dict.fromkeys(constexprs, "constexpr"),
    }
    # Aligned pointers and head-dim multiples: what the JIT sees (a table's row stride may be any width).
    aligned = [*pointers, *(s for s in strides if s != "stride_tb")]
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return signature, constexprs, attrs


DECODE_KERNEL = "engine.execution.attention.triton_backend:_paged_decode_kernel"


def compile_variant(variant: Variant, kernel: str = DECODE_KERNEL) -> KernelReport:
    """Compile `variant` of `kernel` ("module:name") to a cubin afresh (never from Triton's cache) and read
    ptxas's report of it. Raises what Triton raises on a compile error.

    Runs in a process whose triton was imported without TRITON_INTERPRET (`compile_all` starts them): the
    interpreter swaps every `@triton.jit` function, triton.language's own included, when triton is imported.
    """
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not triton.knobs.runtime.interpret, "triton was imported with TRITON_INTERPRET set"
    module, name = kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    signature, constexprs, attrs = _signature(variant)
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as cache, triton.knobs.cache.scope(), triton.knobs.nvidia.scope():
        triton.knobs.cache.dir = cache  # a fresh compile: a cached cubin would carry no ptxas log
        triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", variant.arch, 32),
            )
    return _report(variant, compiled.asm["cubin"], log.getvalue())


def _report(variant: Variant, cubin: bytes, ptxas_log: str) -> KernelReport:
    def number(pattern: str) -> int:
        found = re.search(pattern, ptxas_log)
        if found is None:
            raise ValueError(f"no {pattern!r} in ptxas's report of {variant}:\n{ptxas_log}")
        return int(found.group(1))

    return KernelReport(
        variant, len(cubin), number(r"Used (\d+) registers"), number(r"(\d+) bytes spill stores"),
        number(r"(\d+) bytes spill loads"), number(r"(\d+) bytes stack frame"),
    )  # fmt: skip


def compile_all(
    targets: Sequence[Variant] | None = None, kernel: str = DECODE_KERNEL, workers: int = 2
) -> list[KernelReport]:
    """`targets` (default: every variant) of `kernel`, compiled in `workers` fresh processes."""
    targets = variants() if targets is None else targets
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: triton not yet imported
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_compile_natively) as pool:
        return list(pool.map(compile_variant, targets, [kernel] * len(targets)))


def _compile_natively() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # the CPU tests set it; it is read when triton is imported


def markdown(reports: Sequence[KernelReport]) -> str:
    rows = ["| arch | head dim | GQA group | registers | spill stores / loads (bytes) | stack (bytes) "
            "| cubin (bytes) |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in reports:
        v = r.variant
        rows.append(f"| sm_{v.arch} | {v.head_dim} | {v.group} | {r.registers} | {r.spill_stores} / "
                    f"{r.spill_loads} | {r.stack_bytes} | {r.cubin_bytes} |")  # fmt: skip
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu.triton_aot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workers", type=int, default=2, help="compiling processes")
    args = parser.parse_args(argv)
    import triton

    reports = compile_all(workers=args.workers)
    print(f"triton {triton.__version__}, bfloat16, KV block size {BLOCK_SIZE}")
    print(markdown(reports))


if __name__ == "__main__":
    main()
