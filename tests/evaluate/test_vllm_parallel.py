"""A real vLLM serving the parallel drafters fitted to a tiny verifier: k tokens per draft
forward, lossless.

Each draft is fitted to the verifier's own greedy continuations, so vLLM accepts its tokens only
if it reads the folder as written:

* P-EAGLE (``peagle``, COD training at every anchor): served as ``eagle3`` with
  ``parallel_drafting`` (the plugin's record says so), ``mask_token_id``, ``mask_hidden``;
* DFlash (``dflash``): ``method: dflash``, the aux layer ids, ``mask_token_id``, a
  bidirectional block (``sliding_window_non_causal``), the verifier's embedding;

both with ``d2t`` of a reduced vocabulary. One worker runs the verifier alone and with the draft;
the reference decoder (whose sessions draft k tokens per forward) decodes the same prompts.
"""

from __future__ import annotations

import json

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


#: algorithm -> fitting steps (DFlash learns its attention to the context more slowly)
FIT_STEPS = {"peagle": 100, "dflash": 150}


@pytest.fixture(scope="module", params=sorted(FIT_STEPS))
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from _support import fit_tiny_draft

    algorithm = request.param
    root = tmp_path_factory.mktemp(f"vllm-{algorithm}")
    fitted = fit_tiny_draft(
        root,
        QUESTIONS,
        NEW_TOKENS,
        speculative_tokens=K,
        algorithm=algorithm,
        steps=FIT_STEPS[algorithm],
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
    return {**fitted, "algorithm": algorithm, "baseline": baseline, "parallel": parallel}


def test_the_fitted_draft_is_a_clean_folder_of_its_algorithm(setup):
    config = json.loads((setup["draft"] / "config.json").read_text())
    assert config["speculators_model_type"] == setup["algorithm"]
    report = check_checkpoint(setup["draft"], host=PluginHost())
    assert report.findings == [], [str(f) for f in report.findings]
    assert setup["history"][-1]["full_acc_0"] > 0.5  # the fit worked (training metric)


def test_parallel_drafting_in_vllm_is_lossless_and_accepted(setup):
    parallel: VllmResult = setup["parallel"]
    assert setup["baseline"].outputs == setup["greedy"]
    assert parallel.outputs == setup["baseline"].outputs
    assert parallel.num_draft_tokens == K * parallel.num_drafts
    # A random draft is accepted ~0 times; one read without parallel drafting, mask_hidden,
    # the mask token, a bidirectional block or d2t too.
    assert parallel.per_position_acceptance[0] > 0.5
    assert parallel.mean_acceptance_length > 1.8


def test_acceptance_agrees_with_the_reference_decoder(setup):
    """vLLM's counters against the reference decoder's one-forward session, greedy."""
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
