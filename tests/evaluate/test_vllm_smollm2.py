"""The product test: SmolLM2 served by a real vLLM with an EAGLE-3 draft trained in the test.

1. vLLM generates greedy answers of SmolLM2 alone to four chat prompts (engine 1).
2. An EAGLE-3 draft is built from SmolLM2 by this project and trained for 40 steps on those
   answers (hidden states captured with the transformers backend), then saved; so is a P-EAGLE
   draft (all k tokens in one draft forward) and a DFlash block drafter.
3. vLLM serves SmolLM2 with the draft on the same prompts (engine 2): the output must be
   identical to step 1, the acceptance counters are read from vLLM's metrics, and the
   reference decoder's acceptance on the same prompts must agree within the stated tolerance.

The draft has seen these very answers, so its acceptance is high by construction: the point
is a strong signal that vLLM reads everything the draft needs, not a measure of its quality.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _support import chat_prompts, check_served_report

from speculators_core import PluginHost
from speculators_core.check import check_checkpoint
from speculators_core.evaluate.vllm_env import vllm_available
from speculators_core.evaluate.vllm_runner import VllmResult, run_vllm

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed"),
]

K = 3
NEW_TOKENS = 48
QUESTIONS = [
    "Explain how a bicycle works in a few sentences.",
    "Write a short story about a robot who learns to paint.",
    "What are three tips for staying healthy?",
    "Describe the water cycle for a child.",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    eagle3 = pytest.importorskip("speculators_eagle3")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speculators_core.assets import MissingPackageError, smollm2_path
    from speculators_core.evaluate.vllm_drafts import fit_draft

    try:
        verifier = smollm2_path()
    except MissingPackageError as err:
        pytest.skip(str(err))
    tokenizer = AutoTokenizer.from_pretrained(verifier)
    prompts = chat_prompts(tokenizer, QUESTIONS)
    # host: the installed plugins (the eagle3 record says how vLLM serves the draft).
    options = dict(k=K, max_new_tokens=NEW_TOKENS, max_model_len=512, host=PluginHost())
    baseline = run_vllm(verifier, None, prompts, **options)

    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32).eval()
    sequences = [p + o for p, o in zip(prompts, baseline.outputs)]
    torch.manual_seed(0)  # the draft's initial weights
    draft = eagle3.Eagle3DraftModel.from_verifier(
        verifier,
        aux_layer_ids=[2, 15, 27],  # written explicitly (FORMAT.md 9); vLLM's default for 30 layers
        draft_vocab_size=4096,  # reduced vocabulary: vLLM must apply d2t
        token_counts=dict(Counter(t for s in sequences for t in s)),
        ttt_steps=1,
        noise_std=0.0,
        speculative_tokens=K,
    )
    history = fit_draft(draft, model, sequences, [len(p) for p in prompts], steps=40, lr=1e-3)
    folder = tmp_path_factory.mktemp("smollm2-eagle3") / "draft"
    draft.save_pretrained(folder)
    speculative = run_vllm(verifier, folder, prompts, **options)

    # The same for a P-EAGLE draft: k tokens per draft forward, served with parallel drafting.
    torch.manual_seed(0)
    parallel_draft = eagle3.PEagleDraftModel.from_verifier(
        verifier,
        aux_layer_ids=[2, 15, 27],
        draft_vocab_size=4096,
        token_counts=dict(Counter(t for s in sequences for t in s)),
        num_depths=K,
        max_anchors=0,  # every supervised anchor: the fit sees each chain it is asked for
        noise_std=0.0,
    )
    parallel_history = fit_draft(
        parallel_draft, model, sequences, [len(p) for p in prompts], steps=40, lr=1e-3
    )
    parallel_folder = folder.parent / "peagle"
    parallel_draft.save_pretrained(parallel_folder)
    parallel = run_vllm(verifier, parallel_folder, prompts, **options)

    # And a DFlash block drafter (plugin speculators-dflash), when installed.
    dflash = pytest.importorskip("speculators_dflash")
    torch.manual_seed(0)
    block_draft = dflash.DFlashDraftModel.from_verifier(
        verifier,
        aux_layer_ids=[2, 15, 27],
        draft_vocab_size=4096,
        token_counts=dict(Counter(t for s in sequences for t in s)),
        block_size=K + 1,
        max_anchors=64,
    )
    fit_draft(block_draft, model, sequences, [len(p) for p in prompts], steps=40, lr=1e-2)
    block_folder = folder.parent / "dflash"
    block_draft.save_pretrained(block_folder)
    block = run_vllm(verifier, block_folder, prompts, **options)
    return {
        "verifier": verifier,
        "tokenizer": tokenizer,
        "model": model,
        "prompts": prompts,
        "folder": folder,
        "history": history,
        "baseline": baseline,
        "speculative": speculative,
        "parallel_folder": parallel_folder,
        "parallel_history": parallel_history,
        "parallel": parallel,
        "block_folder": block_folder,
        "block": block,
    }


def test_the_trained_draft_passes_check(run):
    report = check_checkpoint(run["folder"], host=PluginHost())
    assert report.findings == [], [str(f) for f in report.findings]
    assert report.verifier == run["verifier"]


def test_greedy_output_is_identical_to_the_verifier_alone(run):
    baseline, speculative = run["baseline"], run["speculative"]
    assert speculative.outputs == baseline.outputs
    assert all(len(o) > 0 for o in baseline.outputs)
    # The answers are about their own prompts (token ids in, ids out, in order).
    assert "bicycle" in run["tokenizer"].decode(baseline.outputs[0]).lower()
    assert "water" in run["tokenizer"].decode(baseline.outputs[3]).lower()


def test_counters_are_read_and_consistent(run):
    result: VllmResult = run["speculative"]
    generated = sum(len(o) for o in result.outputs)
    assert result.num_drafts > 0
    assert result.num_draft_tokens == K * result.num_drafts
    assert sum(result.accepted_per_position) == result.num_accepted_tokens
    assert all(
        a >= b for a, b in zip(result.accepted_per_position, result.accepted_per_position[1:])
    )
    after_prefill = generated - len(result.outputs)
    assert (
        result.num_drafts
        <= after_prefill
        <= result.num_drafts + result.num_accepted_tokens + len(result.outputs)
    )


def test_the_trained_draft_is_accepted(run):
    result: VllmResult = run["speculative"]
    # An untrained draft is accepted 0 times on SmolLM2 (FORMAT.md 9).
    assert result.per_position_acceptance[0] > 0.5, result.to_json()
    assert result.mean_acceptance_length > 1.5, result.to_json()


def test_reference_decoder_agrees_with_vllm(run):
    """Tolerance: mean acceptance length within 0.15, accepted counts per position within 10% (+3).

    Both run greedy with the same draft on the same prompts; counts can differ only where the
    two implementations disagree on a near-tied argmax, or in how a sequence's last round
    (cut by the token budget or EOS) is counted.
    """
    assert_reference_agrees(run, run["folder"], run["speculative"])


def assert_reference_agrees(run: dict, folder, vllm: VllmResult) -> None:
    """The reference decoder with the draft in ``folder`` on the same prompts accepts what vLLM
    accepted (the tolerance of :func:`test_reference_decoder_agrees_with_vllm`)."""
    from speculators_core import load_speculator
    from speculators_core.evaluate.reference import DecodeStats, ReferenceDecoder

    draft = load_speculator(folder, verifier=run["verifier"]).eval()
    eos = [run["tokenizer"].eos_token_id]
    decoder = ReferenceDecoder(run["model"], draft, k=K, eos_token_ids=eos)
    total = DecodeStats(k=K)
    same = 0
    for prompt, vllm_out in zip(run["prompts"], vllm.outputs):
        result = decoder.generate(prompt, max_new_tokens=NEW_TOKENS)
        total.merge(result.stats)
        same += result.tokens == vllm_out
    detail = (vllm.to_json() | {"outputs": None}, total.to_json(), f"{same}/4 identical outputs")
    assert abs(vllm.mean_acceptance_length - total.mean_acceptance_length) <= 0.15, detail
    for got, want in zip(vllm.accepted_per_position, total.accepted_per_position):
        assert abs(got - want) <= max(3, 0.1 * want), detail


def test_a_peagle_draft_on_smollm2_is_lossless_accepted_and_agrees(run):
    """The P-EAGLE draft: clean check, vLLM's output identical to SmolLM2 alone with parallel
    drafting, accepted, and the reference decoder's one-forward session agrees with vLLM."""
    report = check_checkpoint(run["parallel_folder"], host=PluginHost())
    assert report.findings == [], [str(f) for f in report.findings]
    parallel: VllmResult = run["parallel"]
    assert parallel.outputs == run["baseline"].outputs
    assert parallel.num_draft_tokens == K * parallel.num_drafts
    assert parallel.per_position_acceptance[0] > 0.5, parallel.to_json()
    assert parallel.mean_acceptance_length > 1.5, parallel.to_json()

    assert_reference_agrees(run, run["parallel_folder"], parallel)


def test_a_dflash_draft_on_smollm2_is_lossless_and_agrees(run):
    """The DFlash draft (40 fitting steps: DFlash learns slowly, so its acceptance here is low
    and only has to be non-zero): clean check, vLLM's output identical to SmolLM2 alone, and
    the reference decoder's block session accepts what vLLM accepts."""
    report = check_checkpoint(run["block_folder"], host=PluginHost())
    assert report.findings == [], [str(f) for f in report.findings]
    block: VllmResult = run["block"]
    assert block.outputs == run["baseline"].outputs
    assert block.num_draft_tokens == K * block.num_drafts
    assert block.num_accepted_tokens > 0, block.to_json()  # a random draft: 0

    assert_reference_agrees(run, run["block_folder"], block)


def test_the_server_route_on_smollm2(run, tmp_path):
    """``vllm serve`` for SmolLM2 alone, with the draft at k = 1 and 3, and with n-gram lookup, one
    at a time, driven over HTTP: lossless token for token, τ equal to the server's own counts,
    speed-ups the ratios of the measured rates, the chosen k the fastest measured."""
    from speculators_core.evaluate.vllm_server import compare_served

    report = compare_served(
        run["folder"],
        run["prompts"],
        plugin_host=PluginHost(),
        k_values=[1, 3],
        concurrencies=[2],
        max_new_tokens=NEW_TOKENS,
        verifier=str(run["verifier"]),
        log_dir=tmp_path,
    )
    check_served_report(
        report, ks=[1, 3], levels=[2], prompts=len(QUESTIONS), new_tokens=NEW_TOKENS
    )
    for k in ("1", "3"):
        # The draft has seen these answers: vLLM accepts most first tokens through the server too.
        assert report["draft"][k]["acceptance_per_position"][0] > 0.5, report["draft"][k]
