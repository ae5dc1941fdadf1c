"""vLLM for CPU serves EAGLE-3 drafts for the verifier families it supports, losslessly.

For each family vLLM 0.32 gives the EAGLE-3 interface (Mistral, Qwen2 with attention biases, Qwen3,
the Qwen3-MoE mixture of experts, gpt-oss with experts and sliding windows), a tiny random
verifier of that family and an EAGLE-3 draft fitted to its own greedy continuations: one vLLM
worker runs each verifier alone and with its draft. The outputs must be transformers' greedy
continuations token for token, and the draft's tokens must be accepted (vLLM reads the draft as
written). The families vLLM does not serve are in the user guide's family table (Gemma 2/3: no
EAGLE-3 interface in vLLM 0.32; Qwen2.5-VL/Qwen3-VL: vLLM's processors need torchvision, which
the CPU build of torch cannot have beside it).
"""

from __future__ import annotations

import pytest

from speculators_core import PluginHost
from speculators_core.evaluate.vllm_env import vllm_available
from speculators_core.evaluate.vllm_runner import VllmJob, run_vllm_jobs

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed"),
]

FAMILIES = ["mistral", "qwen2", "qwen3", "qwen3_moe", "gpt_oss"]
K = 3
NEW_TOKENS = 16
QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea."]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    from _support import fit_tiny_draft

    fitted = {
        family: fit_tiny_draft(
            tmp_path_factory.mktemp(family),
            QUESTIONS,
            NEW_TOKENS,
            speculative_tokens=K,
            model_type=family,
        )
        for family in FAMILIES
    }
    jobs = []
    for family in FAMILIES:
        common = dict(
            verifier=fitted[family]["verifier"],
            prompts=fitted[family]["prompts"],
            k=K,
            max_new_tokens=NEW_TOKENS,
            ignore_eos=True,
            max_model_len=256,
            host=PluginHost(),
        )
        jobs += [VllmJob(draft=None, **common), VllmJob(draft=fitted[family]["draft"], **common)]
    results = run_vllm_jobs(jobs)
    return {
        family: {
            "greedy": fitted[family]["greedy"],
            "baseline": results[2 * i],
            "speculative": results[2 * i + 1],
        }
        for i, family in enumerate(FAMILIES)
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_serves_the_family_losslessly(served: dict[str, dict], family: str) -> None:
    got = served[family]
    assert got["baseline"].outputs == got["greedy"]  # vLLM alone = transformers' greedy
    assert got["speculative"].outputs == got["baseline"].outputs
    spec = got["speculative"]
    assert spec.num_drafts > 0 and spec.num_draft_tokens == K * spec.num_drafts
    assert spec.num_accepted_tokens > 0, "vLLM accepted none of the fitted draft's tokens"
