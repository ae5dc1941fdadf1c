"""A real vLLM serving a DFlash draft fitted to a tiny verifier: block drafting, lossless.

The draft is fitted to the verifier's own greedy continuations, so vLLM accepts its tokens only
if it reads the folder as written: ``method: dflash``, the aux layer ids, ``mask_token_id``,
a bidirectional block (``sliding_window_non_causal``), ``lm_head`` and ``d2t`` of a reduced
vocabulary, the verifier's embedding. One worker runs the verifier alone and with the draft; the
reference decoder (whose DFlash session drafts a block per forward) decodes the same prompts.
"""

from __future__ import annotations

import pytest

from speculators_core import PluginHost
from speculators_core.check import check_checkpoint
from speculators_core.evaluate.vllm_env import vllm_available
from speculators_core.evaluate.vllm_runner import VllmJob, VllmResult, run_vllm_jobs

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed"),
]

K = 3
NEW_TOKENS = 24
QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I sort a list in Python?",
    "Explain photosynthesis.",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from _support import fit_tiny_draft

    root = tmp_path_factory.mktemp("vllm-dflash")
    fitted = fit_tiny_draft(
        root, QUESTIONS, NEW_TOKENS, speculative_tokens=K, algorithm="dflash", steps=150
    )
    common = dict(
        verifier=fitted["verifier"],
        prompts=fitted["prompts"],
        k=K,
        max_new_tokens=NEW_TOKENS,
        ignore_eos=True,
        max_model_len=256,
        host=PluginHost(),
    )
    baseline, parallel = run_vllm_jobs(
        [VllmJob(draft=None, **common), VllmJob(draft=root / "draft", **common)]
    )
    return {**fitted, "baseline": baseline, "parallel": parallel}


def test_the_fitted_draft_is_a_clean_dflash_folder(setup):
    report = check_checkpoint(setup["draft"], host=PluginHost())
    assert report.findings == [], [str(f) for f in report.findings]
    assert setup["history"][-1]["full_acc_0"] > 0.5  # the fit worked (training metric)


def test_block_drafting_in_vllm_is_lossless_and_accepted(setup):
    parallel: VllmResult = setup["parallel"]
    assert setup["baseline"].outputs == setup["greedy"]
    assert parallel.outputs == setup["baseline"].outputs
    assert parallel.num_draft_tokens == K * parallel.num_drafts
    # A random draft is accepted ~0 times; one read with other aux ids, a causal block, another
    # mask token or without d2t too.
    assert parallel.per_position_acceptance[0] > 0.5
    assert parallel.mean_acceptance_length > 1.8


def test_acceptance_agrees_with_the_reference_decoder(setup):
    """vLLM's counters against the reference decoder's one-forward DFlash session, greedy."""
    from _support import assert_acceptance_agrees

    from speculators_core import load_speculator
    from speculators_core.evaluate.reference import DecodeStats, ReferenceDecoder

    draft = load_speculator(setup["draft"], verifier=setup["verifier"]).eval()
    decoder = ReferenceDecoder(setup["model"], draft, k=K)
    total = DecodeStats(k=K)
    outputs = []
    for prompt in setup["prompts"]:
        result = decoder.generate(prompt, max_new_tokens=NEW_TOKENS)
        total.merge(result.stats)
        outputs.append(result.tokens)
    assert outputs == setup["parallel"].outputs
    assert_acceptance_agrees(setup["parallel"], total)
