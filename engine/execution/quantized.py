"""Block-quantized weights (GGUF's Q4_1 and Q8_0) and the C kernels that compute with them on the CPU.

`--weight-format q4_1` keeps every linear layer's weight as Q4_1 blocks (a quarter of float16's bytes)
and the output head as Q8_0. Where the model was converted from a GGUF whose blocks dequantize exactly to
its weights (the default SmolLM2: its GGUF is Q4_1 throughout, its embedding Q8_0), those blocks are used
as they are, so the weights are exactly the float32 model's; otherwise the weights are quantized here.
The kernels (engine/execution/csrc/quantized.c) quantize each activation row to int8 blocks and take integer
dot products, as llama.cpp does: not the float32 model's arithmetic, so `--weight-format native` stays the
exact path.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.execution import kernels
from engine.execution.weight_cache import WeightCache, cache_path, parameter_names, weight_key

log = logging.getLogger(__name__)

Q4_1, Q8_0 = 1, 2
BLOCK = 32
BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}
_GGUF_TYPES = {"Q4_1": Q4_1, "Q8_0": Q8_0}


def _fields(c_type, *names: str) -> list[tuple]:
    return [(name, c_type) for name in names]


class Matrix(ctypes.Structure):
    _fields_ = _fields(ctypes.c_void_p, "data", "bias") + _fields(ctypes.c_int64, "n", "k", "format")


class Layer(ctypes.Structure):
    _fields_ = _fields(ctypes.c_void_p, "input_norm", "post_norm") + _fields(
        Matrix, "qkv", "o", "gate_up", "down"
    )


class Shape(ctypes.Structure):
    _fields_ = _fields(ctypes.c_int64, "hidden", "heads", "kv_heads", "head_dim", "intermediate") + _fields(
        ctypes.c_float, "eps", "scale"
    )


class Step(ctypes.Structure):
    _fields_ = (
        _fields(ctypes.c_void_p, "k_cache", "v_cache", "slots", "tables", "lens")
        + _fields(ctypes.c_int64, "num_slots", "width", "block_size")
        + _fields(ctypes.c_void_p, "cos", "sin")
    )


class Scratch(ctypes.Structure):
    _fields_ = _fields(ctypes.c_void_p, "h", "qkv", "q", "attn", "gu")


def _declare(library: ctypes.CDLL) -> None:
    library.quantized_matmul.restype = ctypes.c_int
    library.quantized_matmul.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(Matrix), ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_int,
    ]  # fmt: skip
    library.decode_layer.restype = ctypes.c_int
    library.decode_layer.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(Layer), ctypes.POINTER(Shape), ctypes.POINTER(Step),
        ctypes.POINTER(Scratch),
    ]  # fmt: skip


_library = kernels.Library("quantized", _declare)


def load() -> ctypes.CDLL | None:
    """The kernel library, built on first call; None (the reason in `load_error()`) if it cannot be."""
    return _library.get()


def load_error() -> str | None:
    return _library.error


class QuantizedLinear:
    """A linear layer on block-quantized weights in the kernels' layout (`packed`, as `pack` makes it from
    GGUF's blocks), with an optional float32 bias."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, n: int, k: int, format: int) -> None:
        assert packed.dtype == torch.uint8 and packed.numel() == packed_size(format, n, k)
        self.packed = packed
        self.bias, self.n, self.k, self.format = bias, n, k, format
        self.matrix = Matrix(self.packed.data_ptr(), 0 if bias is None else bias.data_ptr(), n, k, format)
        self.library = load()

    @classmethod
    def from_blocks(
        cls, blocks: torch.Tensor, bias: torch.Tensor | None, n: int, k: int, format: int
    ) -> QuantizedLinear:
        """The layer on GGUF's blocks [n, k / 32 * bytes per block]."""
        return cls(pack(blocks, format, n, k), bias, n, k, format)

    @property
    def blocks(self) -> torch.Tensor:
        """The weights as GGUF blocks (made from the packed copy: for checks, not for computing)."""
        return unpack(self.packed, self.format, self.n, self.k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.k).contiguous()
        out = torch.empty(rows.shape[0], self.n, dtype=torch.float32)
        status = self.library.quantized_matmul(
            rows.data_ptr(), rows.shape[0], ctypes.byref(self.matrix), out.data_ptr(), self.n, 0
        )
        if status != 0:
            raise MemoryError("the quantized matmul could not allocate its buffers")
        return out.view(*x.shape[:-1], self.n)


SLACK = 32
"""Bytes after a packed matrix: the kernels load a row's last scales eight at a time, past its end."""


def packed_size(fmt: int, n: int, k: int) -> int:
    """Bytes of `pack`'s layout of an [n, k] matrix."""
    return n * (k // BLOCK) * BLOCK_BYTES[fmt] + SLACK


def pack(blocks: torch.Tensor, fmt: int, n: int, k: int) -> torch.Tensor:
    """GGUF blocks [n, k / 32 * bytes] -> the kernels' layout: each row's blocks as three runs (every
    block's quantized values, then every scale, then for Q4_1 every minimum), the same bytes in all."""
    raw = blocks.reshape(n, k // BLOCK, BLOCK_BYTES[fmt])
    header = 4 if fmt == Q4_1 else 2
    runs = [raw[:, :, header:], raw[:, :, 0:2], *([raw[:, :, 2:4]] if fmt == Q4_1 else [])]
    rows = torch.cat([run.reshape(n, -1) for run in runs], dim=1)
    return torch.cat([rows.reshape(-1), torch.zeros(SLACK, dtype=torch.uint8)])


def unpack(packed: torch.Tensor, fmt: int, n: int, k: int) -> torch.Tensor:
    """The inverse of `pack`: GGUF blocks [n, k / 32 * bytes]."""
    blocks = k // BLOCK
    rows = packed[: n * blocks * BLOCK_BYTES[fmt]].reshape(n, -1)
    values = BLOCK_BYTES[fmt] - (4 if fmt == Q4_1 else 2)
    q = rows[:, : blocks * values].reshape(n, blocks, values)
    halves = rows[:, blocks * values :].reshape(n, -1, blocks, 2).transpose(1, 2).reshape(n, blocks, -1)
    return torch.cat([halves, q], dim=2).reshape(n, -1)


@dataclass(eq=False)
class DualLinear:
    """A linear layer with its weights twice: for prefill (many rows: FBGEMM's float16 GEMM is faster
    there) and as blocks for decode steps (a quarter of the bytes, in the batch-invariant C kernels).

    Called, it is the prefill copy; `decode` is the `QuantizedLinear`.
    """

    prefill: Callable[[torch.Tensor], torch.Tensor]
    decode: QuantizedLinear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefill(x)


def quantize(weight: torch.Tensor, fmt: int) -> torch.Tensor:
    """Blocks of `weight` [n, k] as ggml's reference quantizers make them (round to nearest): the bytes
    gguf-py's quantizers write."""
    w = weight.detach().float().reshape(-1, BLOCK)
    if fmt == Q8_0:
        d = w.abs().amax(dim=1) / 127
        # ggml's roundf(w * (1 / d)): halves away from zero, and the inverse's rounding, as in every GGUF.
        scaled = w * torch.where(d > 0, 1 / d, 0)[:, None]
        whole = scaled.abs().floor()
        q = (scaled.sign() * (whole + (2 * (scaled.abs() - whole)).floor())).clamp(-128, 127).to(torch.int8)
        scales = d.to(torch.float16).view(torch.uint8).reshape(-1, 2)
        raw = torch.cat([scales, q.view(torch.uint8)], dim=1)
    else:
        low, high = w.amin(dim=1), w.amax(dim=1)
        d = (high - low) / 15
        inverse = torch.where(d > 0, 1 / d, 0)
        q = ((w - low[:, None]) * inverse[:, None] + 0.5).floor().clamp(0, 15).to(torch.uint8)
        nibbles = q[:, :16] | (q[:, 16:] << 4)
        scales = torch.stack([d, low], dim=1).to(torch.float16).view(torch.uint8).reshape(-1, 4)
        raw = torch.cat([scales, nibbles], dim=1)
    return raw.reshape(weight.shape[0], -1).contiguous()


def dequantize(blocks: torch.Tensor, fmt: int, n: int, k: int) -> torch.Tensor:
    """The float32 weights [n, k] of `blocks`, computed as the gguf package dequantizes them."""
    raw = blocks.reshape(-1, BLOCK_BYTES[fmt])
    d = raw[:, :2].contiguous().view(torch.float16).float()
    if fmt == Q8_0:
        return (raw[:, 2:].contiguous().view(torch.int8).float() * d).reshape(n, k)
    m = raw[:, 2:4].contiguous().view(torch.float16).float()
    nibbles = raw[:, 4:]
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=1).float()
    return (d * q + m).reshape(n, k)


def gguf_blocks(path: Path) -> dict[str, tuple[torch.Tensor, int]]:
    """The Q4_1 and Q8_0 tensors of a GGUF file by name, q and k rows in transformers' order (a "llama"
    GGUF keeps them permuted for llama.cpp's RoPE; transformers undoes that when it converts)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    architecture = reader.fields["general.architecture"].contents()
    heads = {
        ".attn_q.": reader.fields[f"{architecture}.attention.head_count"].contents(),
        ".attn_k.": reader.fields[f"{architecture}.attention.head_count_kv"].contents(),
    }
    found = {}
    for tensor in reader.tensors:
        fmt = _GGUF_TYPES.get(tensor.tensor_type.name)
        if fmt is None:
            continue
        rows = np.asarray(tensor.data)
        permuted = [n for role, n in heads.items() if role in tensor.name] if architecture == "llama" else []
        if permuted:
            half = rows.shape[0] // permuted[0] // 2
            rows = rows.reshape(permuted[0], half, 2, -1).swapaxes(2, 1).reshape(rows.shape)
        found[tensor.name] = (torch.from_numpy(np.array(rows, copy=True)), fmt)
    return found


# A decoder layer's linear modules and their names in a GGUF file (blk.N.<name>.weight).
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


CACHE_VERSION = 2
"""Part of every block cache's key: bump it when `quantize` or `pack`'s layout changes."""


def block_cache_path(checkpoint: Path) -> Path:
    """Where the packed blocks made for the checkpoint in `checkpoint` (a directory) are kept."""
    return cache_path(checkpoint, "quantized", f"q4_1 blocks v{CACHE_VERSION}")


class QuantizedLinearFactory:
    """Makes `QuantizedLinear`s from a model's weights: Q4_1 for the layers, Q8_0 for the output head,
    from the GGUF's own blocks where they dequantize exactly to the weight, else quantized here.

    With a `cache`, a layer's packed blocks made once are mapped from its file (the GGUF and the weights
    left unread).
    """

    def __init__(self, hf_model, gguf_path: Path | None = None, cache: WeightCache | None = None) -> None:
        if load() is None:
            raise ValueError(f"the quantized CPU kernels could not be built: {load_error()}")
        self._names = parameter_names(hf_model)
        self._gguf_path = gguf_path
        self._gguf: dict[str, tuple[torch.Tensor, int]] | None = None  # read at the first cache miss
        self.cache = cache or WeightCache(None)

    def __call__(
        self, parts: list[torch.Tensor], bias: torch.Tensor | None, head: bool = False
    ) -> QuantizedLinear:
        fmt = Q8_0 if head else Q4_1
        n, k = sum(part.shape[0] for part in parts), parts[0].shape[1]
        key = weight_key(self._names, parts, "q8_0" if head else "q4_1")

        def make() -> torch.Tensor:
            return pack(torch.cat([self._blocks(part, fmt) for part in parts]), fmt, n, k)

        packed = self.cache.get(key, torch.uint8, (packed_size(fmt, n, k),), make)
        bias = None if bias is None else bias.detach().float().contiguous()
        return QuantizedLinear(packed, bias, n, k, fmt)

    def _blocks(self, weight: torch.Tensor, fmt: int) -> torch.Tensor:
        blocks = self._from_gguf(weight, fmt)
        return quantize(weight, fmt) if blocks is None else blocks

    def _from_gguf(self, weight: torch.Tensor, fmt: int) -> torch.Tensor | None:
        if self._gguf_path is None:
            return None
        if self._gguf is None:
            self._gguf = gguf_blocks(self._gguf_path)
        found = self._gguf.get(_gguf_name(self._names.get(weight.data_ptr(), "")) or "")
        if found is None or found[1] != fmt:
            return None
        blocks = found[0]
        if not torch.equal(dequantize(blocks, fmt, *weight.shape), weight.detach().float()):
            return None
        return blocks


def _gguf_name(param_name: str) -> str | None:
    if param_name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "token_embd.weight" if param_name.startswith("model.") else "output.weight"
    parts = param_name.split(".")  # model.layers.{i}.{module}.{proj}.weight
    if len(parts) == 6 and parts[1] == "layers" and parts[5] == "weight":
        role = GGUF_NAMES.get(f"{parts[3]}.{parts[4]}")
        return None if role is None else f"blk.{parts[2]}.{role}.weight"
    return None
