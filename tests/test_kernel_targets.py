"""The C kernels compute the same bits for every CPU level they are built for.

Each level in `kernels.TARGETS` this CPU can run (the x86-64-v3 baseline everywhere; AVX-VNNI and AVX-512
VNNI where the CPU has them; native), and two builds that only change the vector width the compiler
prefers, must give bit-identical outputs: a request's tokens must not depend on which node of a fleet
serves it. The width builds catch, on any x86-64 CPU, the kind of arithmetic that differs between an AVX2
and an AVX-512 build (a sum split by the compiler's vector width); levels this CPU cannot run are still
compiled, so their code at least builds here.
"""

from __future__ import annotations

import ctypes
import platform

import pytest
import torch

from engine.execution import kernels, quantized
from engine.execution.attention import cpu_backend
from engine.execution.quantized import Q4_1, Q8_0, QuantizedLinear, quantize
from engine.frontend.engine import Engine, EngineConfig
from engine.request import SamplingParams, StoppingParams

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the kernels are x86-64 code")

_V3, _V4 = kernels.BASELINE.cpu_flags, kernels.TARGETS["avx512-vnni"].cpu_flags
# Not levels a user picks: the same code at another vector width than its level's default.
WIDTH_VARIANTS = (
    kernels.Target("x86-64-v3, 128-bit vectors", ("-march=x86-64-v3", "-mprefer-vector-width=128"), _V3),
    kernels.Target(
        "avx512-vnni, 512-bit vectors", ("-march=x86-64-v4", "-mavx512vnni", "-mprefer-vector-width=512"), _V4
    ),
)
ALL_TARGETS = (*kernels.TARGETS.values(), *WIDTH_VARIANTS)


def runnable() -> list[kernels.Target]:
    return [target for target in ALL_TARGETS if not kernels.missing_cpu_flags(target)]


@pytest.fixture(scope="module")
def libraries(tmp_path_factory) -> dict[str, tuple[ctypes.CDLL, ctypes.CDLL]]:
    """Target name -> (quantized library, attention library), for every target this CPU can run."""
    cc = kernels.compiler()
    if cc is None:
        pytest.skip("needs a C compiler")
    built = {}
    for i, target in enumerate(runnable()):
        directory = tmp_path_factory.mktemp(f"target{i}")
        flags = [*kernels.FLAGS, *target.flags]
        paths = [kernels._compile(cc, kernels.source(name), flags, directory / f"{name}.so")
                 for name in ("quantized", "paged_attention")]  # fmt: skip
        q, a = (ctypes.CDLL(str(path)) for path in paths)
        quantized._declare(q)
        cpu_backend._declare(a)
        built[target.name] = (q, a)
    assert {"native", "x86-64-v3", "x86-64-v3, 128-bit vectors"} <= set(built)
    return built


def test_every_level_compiles_even_where_this_cpu_cannot_run_it(tmp_path):
    cc = kernels.compiler()
    if cc is None:
        pytest.skip("needs a C compiler")
    for i, target in enumerate(ALL_TARGETS):
        for name in ("quantized", "paged_attention"):
            assert kernels._compile(
                cc, kernels.source(name), [*kernels.FLAGS, *target.flags], tmp_path / f"{i}-{name}.so"
            ).exists()


@pytest.mark.parametrize("fmt", [Q4_1, Q8_0])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("n,k", [(45, 576), (8, 1536)])  # a partial tile, a partial block group
def test_quantized_matmul_is_bit_identical_on_every_level(libraries, fmt, rows, n, k):
    g = torch.Generator().manual_seed(n * k + rows)
    layer = QuantizedLinear.from_blocks(
        quantize(torch.randn(n, k, generator=g) * 0.05, fmt), torch.randn(n, generator=g), n, k, fmt
    )
    x = torch.randn(rows, k, generator=g)
    outputs = {}
    for name, (library, _) in libraries.items():
        layer.library = library
        outputs[name] = layer(x)
    reference = outputs.pop("x86-64-v3")
    assert all(torch.equal(out, reference) for out in outputs.values()), list(outputs)


@pytest.mark.parametrize("head_dim", [64, 128, 20])  # 20: a dot product with a tail after its lanes
def test_paged_attention_is_bit_identical_on_every_level(libraries, monkeypatch, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    heads, kv_heads, block_size, blocks = 12, 4, 16, 40
    k = torch.randn(kv_heads, blocks * block_size, head_dim, generator=g)
    v = torch.randn(kv_heads, blocks * block_size, head_dim, generator=g)
    q = torch.randn(4, heads, head_dim, generator=g)
    tables = torch.randperm(blocks, generator=g)[:40].reshape(4, 10)
    lens = torch.tensor([1, 37, 160, 99])
    outputs = {}
    for name, (_, library) in libraries.items():
        monkeypatch.setattr(cpu_backend, "load", lambda library=library: library)
        outputs[name] = cpu_backend.paged_decode_attention(q, k, v, tables, lens, block_size, head_dim**-0.5)
    reference = outputs.pop("x86-64-v3")
    assert all(torch.equal(out, reference) for out in outputs.values()), list(outputs)


def test_a_q4_1_engine_gives_the_same_tokens_and_logprobs_on_every_level(
    libraries, tiny_model_dir, monkeypatch
):
    # The whole path: prefill through the quantized matmuls, then decode_layer (norms, RoPE, attention and
    # MLP in one call) and the output head. One request at a time, so that each engine runs the same steps.
    prompts = [[5, 17, 300, 42, 9] * 3, list(range(100, 140))]
    sampling = SamplingParams(top_logprobs=5, prompt_logprobs=True)
    stopping = StoppingParams(max_new_tokens=12, ignore_eos=True)
    results = {}
    for name, (q_library, a_library) in libraries.items():
        monkeypatch.setattr(quantized, "load", lambda library=q_library: library)
        monkeypatch.setattr(cpu_backend, "load", lambda library=a_library: library)
        config = EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", dtype="float32",
                              weight_format="q4_1", attention_backend="cpu", num_kv_blocks=64)  # fmt: skip
        engine = Engine(config)
        try:
            results[name] = [
                (r.token_ids, [(t.logprob, [(a.id, a.logprob) for a in t.top_logprobs]) for t in r.tokens],
                 [t.logprob for t in r.prompt_logprobs])
                for prompt in prompts
                for r in engine.generate([prompt], sampling=sampling, stopping=stopping)
            ]  # fmt: skip
        finally:
            engine.shutdown()
    reference = results.pop("x86-64-v3")
    assert all(result == reference for result in results.values()), list(results)


def test_a_prebuilt_library_is_refused_on_a_cpu_without_its_features(tmp_path, monkeypatch):
    if kernels.compiler() is None:
        pytest.skip("needs a C compiler to prebuild")
    kernels.prebuild(tmp_path / "prebuilt")
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    monkeypatch.setenv(kernels.PREBUILT_ENV, str(tmp_path / "prebuilt"))
    without_avx2 = " ".join(sorted(set(kernels.cpu_signature().split()) - {"avx2", "fma"}))
    monkeypatch.setattr(kernels, "cpu_signature", lambda: without_avx2)
    with pytest.raises(
        RuntimeError, match="built for x86-64-v3 and need CPU features this CPU lacks: avx2, fma"
    ):
        kernels.build("paged_attention")
    # The engine's loader then finds no kernel (instead of dying of SIGILL) and uses torch.
    library = kernels.Library("paged_attention", cpu_backend._declare)
    assert library.get() is None and "avx2" in (library.error or "")


def test_a_prebuilt_library_without_its_manifest_is_refused(tmp_path, monkeypatch):
    if kernels.compiler() is None:
        pytest.skip("needs a C compiler to prebuild")
    kernels.prebuild(tmp_path)
    (tmp_path / "target.json").unlink()
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    monkeypatch.setenv(kernels.PREBUILT_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="no readable target.json"):
        kernels.build("quantized")


def test_a_level_this_cpu_lacks_is_not_built_for_it(monkeypatch):
    monkeypatch.setattr(kernels, "compiler", lambda: "cc")
    monkeypatch.setattr(kernels, "cpu_signature", lambda: "fpu sse sse2")
    monkeypatch.setenv(kernels.TARGET_ENV, "x86-64-v3")
    with pytest.raises(
        RuntimeError, match="the x86-64-v3 kernels need CPU features this CPU lacks: abm, avx"
    ):
        kernels.build("quantized")


def test_an_unknown_level_is_refused(monkeypatch):
    monkeypatch.setattr(kernels, "compiler", lambda: "cc")
    monkeypatch.setenv(kernels.TARGET_ENV, "pentium")
    with pytest.raises(RuntimeError, match="TEXTGEN_KERNEL_TARGET='pentium' is not one of native, x86-64-v3"):
        kernels.build("quantized")
