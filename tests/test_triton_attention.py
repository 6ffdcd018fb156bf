"""The Triton paged decode kernel equals the torch decode path (in Triton's interpreter without CUDA)."""

from __future__ import annotations

import pytest
import torch

from engine.attention import _decode_attention

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernel():
    from engine.triton_attention import paged_decode_attention

    return paged_decode_attention


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size"),
    [(4, 2, 16, 4), (9, 3, 64, 16), (6, 6, 24, 8)],  # GQA; SmolLM2's shape; MHA, head size not a power of 2
)
def test_triton_decode_matches_the_torch_path(kernel, num_heads, num_kv_heads, head_dim, block_size):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # conftest picks the interpreter without CUDA
    rng = torch.Generator().manual_seed(0)
    num_blocks = 12
    k_cache = torch.randn(num_kv_heads, num_blocks * block_size, head_dim, generator=rng)
    v_cache = torch.randn(num_kv_heads, num_blocks * block_size, head_dim, generator=rng)
    tables = [[3, 1, 7], [0], [5, 2, 9, 11]]
    context_lens = [2 * block_size + 1, block_size, 3 * block_size + 2]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    mask = torch.arange(width * block_size)[None, :] < torch.tensor(context_lens)[:, None]
    q = torch.randn(len(tables), num_heads, head_dim, generator=rng)
    scale = head_dim**-0.5

    expected = _decode_attention(
        q.transpose(0, 1), k_cache, v_cache, block_tables, mask[None, :, None, :], block_size, scale
    )
    on = [t.to(device) for t in (q, k_cache, v_cache, block_tables, torch.tensor(context_lens))]
    got = kernel(*on, block_size, scale)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_engine_with_the_triton_backend_gives_the_torch_backends_tokens(tiny_model_dir):
    from engine.engine import Engine, EngineConfig
    from engine.request import StoppingParams

    prompts = [[5, 17, 300, 42, 7], list(range(100, 140)), [900, 901, 902]]
    stopping = StoppingParams(max_new_tokens=6, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        config = EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", kv_block_size=4)
        config.attention_backend = backend
        engine = Engine(config)
        try:
            outputs[backend] = [r.token_ids for r in engine.generate(prompts, stopping=stopping)]
        finally:
            engine.shutdown()
    assert outputs["triton"] == outputs["torch"]
