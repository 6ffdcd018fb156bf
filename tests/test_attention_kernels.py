"""The paged decode kernels (C for the CPU; Triton, in its interpreter without CUDA) equal the torch path."""

from __future__ import annotations

import pytest
import torch

from engine.execution import kernels
from engine.execution.attention import cpu_backend, resolve_decode_backend
from engine.execution.attention.torch_backend import paged_decode_attention as torch_decode_attention

BACKENDS = ["cpu", "triton"]


def kernel_for(backend: str):
    if backend == "triton":
        pytest.importorskip("triton")
        from engine.execution.attention.triton_backend import paged_decode_attention

        return paged_decode_attention, "cuda" if torch.cuda.is_available() else "cpu"
    assert cpu_backend.load() is not None, cpu_backend.load_error()  # gcc is part of the test setup
    return cpu_backend.paged_decode_attention, "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size"),
    [(4, 2, 16, 4), (9, 3, 64, 16), (6, 6, 24, 8)],  # GQA; SmolLM2's shape; MHA, head size not a power of 2
)
def test_decode_kernel_matches_the_torch_path(backend, num_heads, num_kv_heads, head_dim, block_size):
    kernel, device = kernel_for(backend)
    rng = torch.Generator().manual_seed(0)
    num_blocks = 12
    k_cache = torch.randn(num_kv_heads, num_blocks * block_size, head_dim, generator=rng)
    v_cache = torch.randn(num_kv_heads, num_blocks * block_size, head_dim, generator=rng)
    tables = [[3, 1, 7], [0], [5, 2, 9, 11], [4]]
    context_lens = [2 * block_size + 1, block_size, 3 * block_size + 2, 1]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    lens = torch.tensor(context_lens)
    q = torch.randn(len(tables), num_heads, head_dim, generator=rng)
    scale = head_dim**-0.5

    expected = torch_decode_attention(q, k_cache, v_cache, block_tables, lens, block_size, scale)
    on = [t.to(device) for t in (q, k_cache, v_cache, block_tables, lens)]
    got = kernel(*on, block_size, scale)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_cpu_kernel_output_does_not_depend_on_the_batch():
    kernel, _ = kernel_for("cpu")
    rng = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.randn(2, 3, 64 * 16, 64, generator=rng)
    q = torch.randn(5, 9, 64, generator=rng)
    tables = torch.randint(0, 64, (5, 4), generator=rng)
    lens = torch.tensor([50, 3, 64, 17, 33])
    batched = kernel(q, k_cache, v_cache, tables, lens, 16, 0.125)
    for i in range(5):  # bit for bit: each sequence's result is computed on its own
        alone = kernel(q[i : i + 1], k_cache, v_cache, tables[i : i + 1], lens[i : i + 1], 16, 0.125)
        assert torch.equal(alone[0], batched[i])


def test_cpu_kernel_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTGEN_CACHE_DIR", str(tmp_path))
    first = kernels.build("paged_attention")
    assert first.parent == tmp_path / "kernels" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert kernels.build("paged_attention") == first and first.stat().st_mtime_ns == mtime


def test_without_a_compiler_auto_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_library", kernels.Library("paged_attention", cpu_backend._declare))
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    monkeypatch.setenv("TEXTGEN_CACHE_DIR", "/nonexistent-textgen-cache")
    cpu = torch.device("cpu")
    assert resolve_decode_backend("auto", cpu, torch.float32) == ("torch", torch_decode_attention)
    assert "no C compiler" in cpu_backend.load_error()
    with pytest.raises(ValueError, match="could not be built"):
        resolve_decode_backend("cpu", cpu, torch.float32)
    with pytest.raises(ValueError, match="float32 models on the CPU"):
        resolve_decode_backend("cpu", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_decode_backend("flash", cpu, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_with_a_kernel_backend_gives_the_torch_backends_tokens(tiny_model_dir, backend):
    from engine.frontend.engine import Engine, EngineConfig
    from engine.request import StoppingParams

    kernel_for(backend)
    prompts = [[5, 17, 300, 42, 7], list(range(100, 140)), [900, 901, 902]]
    stopping = StoppingParams(max_new_tokens=6, ignore_eos=True)
    outputs = {}
    for name in ("torch", backend):
        config = EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", kv_block_size=4)
        config.attention_backend = name
        engine = Engine(config)
        try:
            outputs[name] = [r.token_ids for r in engine.generate(prompts, stopping=stopping)]
        finally:
            engine.shutdown()
    assert outputs[backend] == outputs["torch"]


def test_triton_kernel_in_bfloat16_matches_the_torch_path_in_float32():
    kernel, device = kernel_for("triton")
    rng = torch.Generator().manual_seed(2)
    k_cache, v_cache = torch.randn(2, 2, 16 * 16, 64, generator=rng).to(torch.bfloat16)
    tables = torch.tensor([[3, 9, 1], [0, 0, 0], [15, 4, 7]])
    lens = torch.tensor([40, 5, 48])
    q = torch.randn(3, 8, 64, generator=rng).to(torch.bfloat16)
    expected = torch_decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, 16, 0.125)
    got = kernel(*(t.to(device) for t in (q, k_cache, v_cache, tables, lens)), 16, 0.125)
    assert got.dtype == torch.bfloat16  # the sums are float32 inside: only the output is rounded
    torch.testing.assert_close(got.cpu().float(), expected, rtol=1e-2, atol=1e-2)
