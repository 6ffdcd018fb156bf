"""lm-evaluation-harness (`lm-eval`, model `local-completions`) through the HTTP front on SmolLM2 with
`--weight-format native`: its log-likelihood requests (`echo` with `logprobs`, `max_tokens: 1`) score a local
multiple-choice task (tests/data/lm_eval) as lm-eval's own `hf` model does on the same weights. Offline: the
task's jsonl is read by HF datasets' json builder."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ServerThread

from engine.frontend.engine import EngineConfig
from service.config import ServerConfig

TASK = "textgen_tiny_mc"
TASK_DIR = Path(__file__).resolve().parent / "data" / "lm_eval"
REPO = TASK_DIR.parents[2]  # the task's data_files path is relative to the repository root
# The same weights in float32 on both sides, through different kernels: a choice's log-likelihood (a sum over
# its few tokens) differs by rounding alone, far below this; a misaligned prompt token would not.
LOGLIKELIHOOD_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """lm-eval imported with HF datasets and the Hub offline, run from the repository root."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
        patch.chdir(REPO)
        yield


@pytest.fixture(scope="module")
def native_server(smollm2_dir):
    engine = EngineConfig(device="cpu", dtype="float32", weight_format="native", num_kv_blocks=256)
    server = ServerThread(ServerConfig(engine=engine, host="127.0.0.1", port=0, http_port=0)).start()
    yield server
    server.stop()


def evaluate(model: str, model_args: dict) -> dict:
    """lm-eval's results for the local task, with every sample's log-likelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        log_samples=True,
    )


def loglikelihoods(results: dict) -> dict[int, list[float]]:
    """Each document's choices' log-likelihoods, by document id."""
    samples = results["samples"][TASK]
    return {sample["doc_id"]: [float(resp[0][0]) for resp in sample["resps"]] for sample in samples}


def test_lm_eval_local_completions_scores_as_its_hf_model_on_the_same_weights(
    offline, native_server, smollm2_dir
):
    url = f"http://127.0.0.1:{native_server.server.http.port}/v1/completions"
    textgen = evaluate(
        "local-completions",
        {
            "model": native_server.engine.model_info.name,
            "base_url": url,
            "tokenizer": str(smollm2_dir),
            "tokenizer_backend": "huggingface",
            "num_concurrent": 8,  # lm-eval's requests in flight at once: textgen batches them
        },
    )
    hf = evaluate("hf", {"pretrained": str(smollm2_dir), "dtype": "float32", "device": "cpu"})

    ours, theirs = loglikelihoods(textgen), loglikelihoods(hf)
    assert len(ours) == 12 and ours.keys() == theirs.keys()
    for doc_id, choices in ours.items():
        assert choices == pytest.approx(theirs[doc_id], abs=LOGLIKELIHOOD_TOLERANCE), doc_id
    accuracy = textgen["results"][TASK]["acc,none"]
    assert accuracy == pytest.approx(hf["results"][TASK]["acc,none"], abs=0.01)
