"""The capture-safety check fails on what a CUDA graph's replay cannot repeat, and one decode step of the
padded buffers (exactly what `DecodeGraphs` captures on CUDA) passes it, here on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from engine.core.kv_cache import KVCache
from engine.execution.attention import torch_backend
from engine.execution.capture_safety import CaptureSafetyError, forbid_host_work
from engine.execution.decode_graphs import DecodeGraphs
from engine.execution.model_runner import ModelRunner
from engine.execution.models.llama import LlamaModel

X = torch.arange(6.0)

UNSAFE = {
    "item": (lambda: X[0].item(), "reads a device value"),
    "int of a tensor": (lambda: int(X.max()), "reads a device value"),
    "bool of a tensor": (lambda: bool((X > 2).any()), "reads a device value"),
    "nonzero": (lambda: X.nonzero(), "nonzero"),
    "boolean mask": (lambda: X[X > 2], "boolean-mask"),
    "torch.tensor of a list": (lambda: torch.tensor([1, 2, 3]), "host data"),
    "from_numpy": (lambda: torch.from_numpy(np.arange(3)), "host data"),
    "equal": (lambda: torch.equal(X, X), "host"),
}


@pytest.mark.parametrize("inference", [False, True], ids=["grad mode", "inference mode"])
@pytest.mark.parametrize("name", UNSAFE)
def test_every_host_read_sync_or_host_tensor_is_refused(name, inference):
    operation, reason = UNSAFE[name]
    with torch.inference_mode(inference), pytest.raises(CaptureSafetyError, match=reason), forbid_host_work():
        operation()


def test_device_work_with_python_numbers_passes():
    y = X.clone()
    with forbid_host_work():
        y[torch.arange(2)] = 1.0  # a number wrapped as a 0-d tensor: a kernel argument
        z = torch.where(y > 2, y * 0.5, torch.full_like(y, 3.0)).softmax(-1)
    assert z.shape == X.shape


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_padded_decode_step_of_every_bucket_passes_the_check(tiny_llama, backend):
    if backend == "triton":
        pytest.importorskip("triton")  # in its interpreter on the CPU: the same host code as on CUDA
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runner = ModelRunner(tiny_llama, device, "float32", num_kv_blocks=64, block_size=16,
                         attention_backend=backend, weight_format="native", model_impl="lean")  # fmt: skip
    runner.pad_decode_batches(max_batch_size=8, max_context_len=128)
    runner.decode_graphs.check_capture_safety()  # what `capture_decode_graphs` runs before capturing


def test_the_check_catches_a_step_that_reads_positions_on_the_host(tiny_llama):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model = LlamaModel(hf_model)  # its RoPE table not built ahead: `rope` reads the largest position
    config = hf_model.config
    cache = KVCache(config.num_hidden_layers, 16, 16, config.num_key_value_heads, model.head_dim,
                    torch.float32, "cpu")  # fmt: skip
    graphs = DecodeGraphs(model, cache, torch_backend.paged_decode_attention, (1, 2), 64, capture=False)
    with pytest.raises(CaptureSafetyError, match="reads a device value"):
        graphs.check_capture_safety()
    model.complete_rope(64)  # what `pad_decode_batches` does: then nothing reads the host
    graphs.check_capture_safety()
