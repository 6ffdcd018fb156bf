"""CPU linear layers with weights packed as float16 for FBGEMM; activations and sums stay float32.

On the CPU the model's matmuls are most of a step, and at decode batch sizes they are bound by reading
the weights. FBGEMM's float16 GEMM reads half the bytes of a float32 weight and widens them to float32
in registers, so the arithmetic is float32 throughout and only the weights are rounded (to float16,
relative error <= 2^-11). On the AVX2 CPU this project is measured on it is also a better-blocked kernel
than MKL's float32 one, and greedy outputs of the test prompts stay token for token those of float32
(README, "CPU dtype, weights and attention", has the timings).

The weights are laid out in FBGEMM's packed format here (`fp16_layout`: a few tensor copies, where torch's
`linear_prepack_fp16` goes element by element) and multiplied by FBGEMM's own kernel through
csrc/fp16_gemm.cpp, so a layout can be cached and mapped at the next start (`Fp16LinearFactory`,
`engine.execution.weight_cache`) and the results stay torch's op's bits.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable

import torch
from torch import nn

from engine.execution import kernels
from engine.execution.weight_cache import WeightCache, weight_key

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


BLOCK_ROWS = 512
"""Inputs per block of FBGEMM's packed float16 layout (its default, what torch's packer uses)."""

FP16_MAX = 65504.0  # torch saturates weights to float16's range before FBGEMM packs them


def _declare(library: ctypes.CDLL) -> None:
    library.fp16_block_cols.restype = ctypes.c_int
    library.fp16_block_cols.argtypes = []
    library.fp16_matrix.restype = ctypes.c_void_p
    library.fp16_matrix.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    library.fp16_matrix_free.restype = None
    library.fp16_matrix_free.argtypes = [ctypes.c_void_p]
    library.fp16_gemm.restype = ctypes.c_int
    library.fp16_gemm.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int
    ]  # fmt: skip


_library = kernels.Library("fp16_gemm", _declare)


def fp16_gemm_library() -> ctypes.CDLL | None:
    """engine/execution/csrc/fp16_gemm.cpp, built at first call; None where it cannot be (then torch's own
    packer and op run the same GEMM, packing slowly)."""
    return _library.get()


def fp16_layout_size(n: int, k: int, block_cols: int) -> int:
    """Elements of FBGEMM's packed layout of a weight [n, k] (`fp16_layout`)."""
    return -(-k // BLOCK_ROWS) * BLOCK_ROWS * -(-n // block_cols) * block_cols


def fp16_layout(weight: torch.Tensor, block_cols: int) -> torch.Tensor:
    """A float32 weight [n, k] (outputs, inputs) in FBGEMM's packed float16 layout, as torch's
    `linear_prepack_fp16` lays it out (saturated to float16's range, rounded to nearest even): the inputs
    in blocks of `BLOCK_ROWS`, each block's outputs in column blocks of `block_cols` (zero-padded), each
    column block row-major; the last row block holds only its rows, and zeros fill the tail."""
    n, k = weight.shape
    num_col_blocks = -(-n // block_cols)
    # Rounded to float16 first (contiguous), then moved: a transposing copy of 2-byte values is the cheap one.
    padded = torch.empty(num_col_blocks * block_cols, k, dtype=torch.float16)
    padded[:n] = weight.detach().float().clamp(-FP16_MAX, FP16_MAX)
    padded[n:] = 0
    columns = padded.view(num_col_blocks, block_cols, k)
    out = torch.empty(fp16_layout_size(n, k, block_cols), dtype=torch.float16)
    out[k * padded.shape[0] :] = 0
    full = k // BLOCK_ROWS * BLOCK_ROWS
    blocks = columns[:, :, :full].reshape(num_col_blocks, block_cols, -1, BLOCK_ROWS).permute(2, 0, 3, 1)
    out[: full * padded.shape[0]].view(blocks.shape).copy_(blocks)
    if full < k:
        last = columns[:, :, full:].transpose(1, 2)
        out[full * padded.shape[0] : k * padded.shape[0]].view(last.shape).copy_(last)
    return out


class Fp16Linear:
    """`F.linear(x, weight, bias)` on FBGEMM's float16 GEMM, over a weight already in its packed layout
    (`fp16_layout`, or its cached copy): the bits of torch's `linear_dynamic_fp16`."""

    def __init__(self, layout: torch.Tensor, bias: torch.Tensor | None, n: int, k: int) -> None:
        library = fp16_gemm_library()
        assert library is not None, "Fp16Linear runs on the fp16_gemm kernel"
        block_cols = library.fp16_block_cols()
        assert layout.dtype == torch.float16 and layout.numel() == fp16_layout_size(n, k, block_cols)
        self.layout, self.n, self.k, self.library = layout, n, k, library
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.matrix = library.fp16_matrix(k, n, BLOCK_ROWS, block_cols, layout.data_ptr())
        if not self.matrix:
            raise MemoryError("FBGEMM's float16 matrix could not be allocated")
        weakref.finalize(self, library.fp16_matrix_free, self.matrix)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.k).contiguous()
        out = torch.empty(rows.shape[0], self.n, dtype=torch.float32)
        threads = torch.get_num_threads()
        m = rows.shape[0]
        if m and self.library.fp16_gemm(rows.data_ptr(), m, self.matrix, out.data_ptr(), threads) != 0:
            raise RuntimeError("FBGEMM's float16 GEMM failed")
        if self.bias is not None:
            out.add_(self.bias)  # as torch's op: the bias after the GEMM
        return out.view(*x.shape[:-1], self.n)


FP16_CACHE_VERSION = 1
"""Part of every float16 layout cache's key: bump it when `fp16_layout` changes."""


def fp16_cache_version() -> str:
    """What a cached float16 layout depends on besides the checkpoint: the layout's version and block sizes
    (FBGEMM's column blocks follow the CPU's vector width) and torch's version (its FBGEMM)."""
    library = fp16_gemm_library()
    assert library is not None, "float16 layouts are cached for the fp16_gemm kernel"
    block = f"{BLOCK_ROWS}x{library.fp16_block_cols()}"
    return f"fp16 layout v{FP16_CACHE_VERSION} blocks {block} torch {torch.__version__}"


class Fp16LinearFactory:
    """Makes `Fp16Linear`s from a model's weights (`names` as `parameter_names` gives them), each layout
    mapped from `cache` where it holds it, else laid out here (and kept for `cache.save()`)."""

    def __init__(self, names: dict[int, str], cache: WeightCache) -> None:
        library = fp16_gemm_library()
        assert library is not None, "Fp16LinearFactory runs on the fp16_gemm kernel"
        self.names, self.cache, self.block_cols = names, cache, library.fp16_block_cols()

    def __call__(self, parts: list[torch.Tensor], bias: torch.Tensor | None, head: bool = False) -> Linear:
        n, k = sum(part.shape[0] for part in parts), parts[0].shape[1]
        shape = (fp16_layout_size(n, k, self.block_cols),)

        def make() -> torch.Tensor:
            return fp16_layout(torch.cat(parts) if len(parts) > 1 else parts[0], self.block_cols)

        layout = self.cache.get(weight_key(self.names, parts, "fp16"), torch.float16, shape, make)
        return Fp16Linear(layout, bias, n, k)


def fp16_packed_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    """`F.linear(x, weight, bias)` on FBGEMM's float16-packed GEMM, the weight packed once here."""
    library = fp16_gemm_library()
    if library is not None:
        layout = fp16_layout(weight, library.fp16_block_cols())
        return Fp16Linear(layout, bias, *weight.shape)
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
