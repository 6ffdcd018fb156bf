"""The weight cache: a checkpoint's q4_1 blocks and float16 layouts made once, mapped at the next start,
keyed by everything they depend on, never trusted when unreadable, serving the bits of weights made fresh."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from engine.core.step import StepRow
from engine.execution import packed_linear, quantized, weight_cache
from engine.execution.model_runner import ModelRunner
from engine.execution.packed_linear import fbgemm_available, fp16_gemm_library
from engine.execution.quantized import block_cache_path
from engine.execution.weight_cache import WeightCache, cache_path

needs_kernels = pytest.mark.skipif(
    not fbgemm_available() or fp16_gemm_library() is None or quantized.load() is None,
    reason="needs FBGEMM and the C kernels (x86-64 with a compiler)",
)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A weight cache of each test's own (the kernels stay where they were built)."""
    monkeypatch.setattr(weight_cache, "cache_dir", lambda: tmp_path / "cache")
    return tmp_path / "cache"


def made_by(factory, calls: list[int]):
    def make() -> torch.Tensor:
        calls.append(1)
        return factory()

    return make


def test_a_saved_entry_is_read_back_instead_of_made(tmp_path):
    path = tmp_path / "entries.safetensors"
    first, calls = WeightCache(path), []
    made = first.get("w.fp16", torch.float16, (6,), made_by(lambda: torch.arange(6).half(), calls))
    first.save()
    again = WeightCache(path).get(
        "w.fp16", torch.float16, (6,), made_by(lambda: torch.zeros(6).half(), calls)
    )
    assert len(calls) == 1 and torch.equal(again, made)


def test_an_entry_of_another_dtype_or_shape_is_made_again(tmp_path):
    path = tmp_path / "entries.safetensors"
    first = WeightCache(path)
    first.get("w", torch.uint8, (4,), lambda: torch.ones(4, dtype=torch.uint8))
    first.save()
    second, calls = WeightCache(path), []
    zeros = torch.zeros(5, dtype=torch.uint8)
    assert torch.equal(second.get("w", torch.uint8, (5,), made_by(lambda: zeros, calls)), zeros)
    second.get("w", torch.float16, (4,), made_by(lambda: torch.zeros(4).half(), calls))
    assert len(calls) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_an_unreadable_file_is_ignored_and_written_anew(tmp_path, damage):
    path = tmp_path / "entries.safetensors"
    first = WeightCache(path)
    first.get("w", torch.float32, (1000,), lambda: torch.arange(1000.0))
    first.save()
    data = path.read_bytes()
    path.write_bytes(data[:-100] if damage == "truncated" else b"\xff" * len(data))
    second, calls = WeightCache(path), []
    made = second.get("w", torch.float32, (1000,), made_by(lambda: torch.arange(1000.0), calls))
    assert calls and torch.equal(made, torch.arange(1000.0))
    second.save()
    third = WeightCache(path).get("w", torch.float32, (1000,), made_by(lambda: torch.zeros(1000), calls))
    assert len(calls) == 1 and torch.equal(third, torch.arange(1000.0))


def test_an_unwritable_cache_is_skipped_not_fatal(tmp_path):
    (tmp_path / "file").write_text("")  # a file where the cache's folder should be: nothing can be written
    cache = WeightCache(tmp_path / "file" / "entries.safetensors")
    made = cache.get("w", torch.float32, (3,), lambda: torch.ones(3))
    cache.save()
    assert torch.equal(made, torch.ones(3)) and not (tmp_path / "file").is_dir()


def test_the_file_is_named_for_the_checkpoints_files_and_the_version(tmp_path):
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"one")
    path = cache_path(checkpoint, "fp16", "v1")
    assert cache_path(checkpoint, "fp16", "v1") == path
    assert cache_path(checkpoint, "fp16", "v2") != path
    (checkpoint / "model.safetensors").write_bytes(b"other")  # rewritten: size (and time) change
    assert cache_path(checkpoint, "fp16", "v1") != path


@needs_kernels
def test_the_float16_cache_is_keyed_by_torchs_version_and_the_block_width(monkeypatch):
    version = packed_linear.fp16_cache_version()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert packed_linear.fp16_cache_version() != version
    monkeypatch.undo()
    wider = SimpleNamespace(fp16_block_cols=lambda: 2 * fp16_gemm_library().fp16_block_cols())
    monkeypatch.setattr(packed_linear, "fp16_gemm_library", lambda: wider)  # another CPU's vector width
    assert packed_linear.fp16_cache_version() != version


def count_made(monkeypatch) -> list[str]:
    """Records each float16 layout and q4_1 block set made (not mapped from the cache) from now on."""
    made: list[str] = []
    layout, pack = packed_linear.fp16_layout, quantized.pack

    def counted_layout(*args, **kwargs):
        made.append("fp16")
        return layout(*args, **kwargs)

    def counted_pack(*args, **kwargs):
        made.append("q4_1")
        return pack(*args, **kwargs)

    monkeypatch.setattr(packed_linear, "fp16_layout", counted_layout)
    monkeypatch.setattr(quantized, "pack", counted_pack)
    return made


Run = tuple[list[int], list[torch.Tensor]]


def prefill_and_decode(runner: ModelRunner) -> Run:
    """A 40-token prefill (FBGEMM's float16 GEMM) and 3 greedy decode steps (the q4_1 kernels)."""
    prompt = [(7 * i + 3) % 500 for i in range(40)]
    table: list[int] = []
    assert runner.allocator.allocate(table, len(prompt) + 4)
    logits = [runner.run([StepRow(prompt, 0, table)], True)]
    tokens = [int(logits[-1].argmax())]
    for step in range(3):
        logits.append(runner.run([StepRow([tokens[-1]], len(prompt) + step, table)], False))
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def assert_same_bits(a: Run, b: Run) -> None:
    assert a[0] == b[0]
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))


def runner(model: str, weight_format: str = "q4_1") -> ModelRunner:
    return ModelRunner(model, "cpu", "float32", num_kv_blocks=16, weight_format=weight_format)


@needs_kernels
def test_a_second_start_maps_every_weight_and_computes_the_same_bits(tiny_model_dir, cache, monkeypatch):
    model = str(tiny_model_dir("llama"))
    made = count_made(monkeypatch)
    cold = prefill_and_decode(runner(model))
    assert "fp16" in made and "q4_1" in made
    assert {path.parent.name for path in cache.rglob("*.safetensors")} == {"fp16", "quantized"}
    made.clear()
    assert_same_bits(prefill_and_decode(runner(model)), cold)
    assert made == []


@needs_kernels
def test_a_corrupt_cache_file_is_rebuilt_and_serves_the_same_bits(tiny_model_dir, cache, monkeypatch):
    model = str(tiny_model_dir("llama"))
    fresh = prefill_and_decode(runner(model))
    for path in cache.rglob("*.safetensors"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    made = count_made(monkeypatch)
    assert_same_bits(prefill_and_decode(runner(model)), fresh)
    assert "fp16" in made and "q4_1" in made
    made.clear()
    prefill_and_decode(runner(model))
    assert made == []  # and the rebuilt files are whole again


@needs_kernels
@pytest.mark.parametrize("weight_format", ["fp16-packed", "q4_1"])
def test_cached_layouts_compute_the_bits_of_torchs_own_packer(tiny_model_dir, monkeypatch, weight_format):
    """The float16 layouts made here (and mapped from the cache) give the bits of torch's packed op."""
    model = str(tiny_model_dir("llama"))
    ours = prefill_and_decode(runner(model, weight_format))
    cached = prefill_and_decode(runner(model, weight_format))
    for module in ("engine.execution.models", "engine.execution.packed_linear"):
        monkeypatch.setattr(f"{module}.fp16_gemm_library", lambda: None)  # torch's prepack and op
    theirs = prefill_and_decode(runner(model, weight_format))
    assert_same_bits(ours, theirs)
    assert_same_bits(cached, theirs)


@needs_kernels
def test_a_changed_checkpoint_gets_new_cache_files(tmp_path, tiny_model_dir, cache):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    runner(str(model))
    before = {path.name for path in cache.rglob("*.safetensors")}
    assert block_cache_path(model).name in before
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")  # a file changed
    runner(str(model))
    after = {path.name for path in cache.rglob("*.safetensors")}
    assert len(after - before) == 2 and block_cache_path(model).name in after - before
