"""The product test in vLLM: a HASS draft served by vLLM 0.32 (``method: "eagle"``) via the export.

vLLM does not read ``speculators_model_type: "eagle"`` folders, so the draft is exported to the
native EAGLE-1 layout (:func:`speculators_hass.export_vllm_eagle`) and served with the verifier:

1. vLLM generates greedy answers of SmolLM2 alone to four chat prompts (engine 1).
2. A HASS draft is built from SmolLM2 and fitted for a few dozen steps on those answers (final
   post-norm states captured with the transformers backend), saved in the speculators format and
   exported.
3. vLLM serves SmolLM2 with the export on the same prompts (engine 2): the output must be
   identical to step 1, the draft must be accepted, and the reference decoder's acceptance on
   the same prompts must agree with vLLM's counters.

The draft has seen these very answers, so its acceptance is high by construction: the point is
a strong signal that vLLM computes what the draft computes, not a measure of its quality.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from speculators_hass import EagleDraftModel, export_vllm_eagle
from speculators_hass.export import vllm_eagle_tensors

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
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speculators_core.assets import MissingPackageError, smollm2_path
    from speculators_core.evaluate.vllm_drafts import fit_draft

    try:
        verifier = smollm2_path()
    except MissingPackageError as err:
        pytest.skip(str(err))
    tokenizer = AutoTokenizer.from_pretrained(verifier)
    prompts: list[list[int]] = [
        # With tokenize=True and return_dict=False the template returns the ids: list[int].
        tokenizer.apply_chat_template(  # type: ignore[misc]
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for q in QUESTIONS
    ]
    options: dict[str, Any] = {"k": K, "max_new_tokens": NEW_TOKENS, "max_model_len": 512}
    baseline = run_vllm(verifier, None, prompts, **options)

    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32).eval()
    sequences = [p + o for p, o in zip(prompts, baseline.outputs)]
    draft = EagleDraftModel.from_verifier(verifier, noise_std=0.0, speculative_tokens=K)
    history = fit_draft(draft, model, sequences, [len(p) for p in prompts], steps=30, lr=1e-3)
    folder = tmp_path_factory.mktemp("smollm2-hass")
    draft.save_pretrained(folder / "draft")
    exported = export_vllm_eagle(folder / "draft", folder / "vllm")
    speculative = run_vllm(verifier, exported, prompts, method="eagle", **options)
    return {
        "verifier": verifier,
        "tokenizer": tokenizer,
        "model": model,
        "prompts": prompts,
        "draft": draft,
        "folder": folder / "draft",
        "exported": exported,
        "history": history,
        "baseline": baseline,
        "speculative": speculative,
    }


def test_the_draft_was_fitted(run: dict[str, Any]) -> None:
    history = run["history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["cond_acc_0"] > 0.5


def test_export_holds_the_saved_draft(run: dict[str, Any]) -> None:
    """The exported tensors are the speculators-format folder's, renamed."""
    exported = load_file(str(run["exported"] / "model.safetensors"))
    reloaded = EagleDraftModel.from_pretrained(run["folder"])
    expected = vllm_eagle_tensors(reloaded)
    assert sorted(exported) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


def test_greedy_output_is_identical_to_the_verifier_alone(run: dict[str, Any]) -> None:
    baseline, speculative = run["baseline"], run["speculative"]
    assert speculative.outputs == baseline.outputs
    assert all(len(o) > 0 for o in baseline.outputs)
    assert "bicycle" in run["tokenizer"].decode(baseline.outputs[0]).lower()


def test_vllm_speculates_and_accepts_the_draft(run: dict[str, Any]) -> None:
    result: VllmResult = run["speculative"]
    assert result.num_drafts > 0
    assert result.num_draft_tokens == K * result.num_drafts
    assert sum(result.accepted_per_position) == result.num_accepted_tokens
    # An untrained draft is accepted 0 times on SmolLM2 (seen while establishing the export).
    assert result.per_position_acceptance[0] > 0.4, result.to_json()
    assert result.mean_acceptance_length > 1.5, result.to_json()


def test_reference_decoder_agrees_with_vllm(run: dict[str, Any]) -> None:
    """Tolerance: mean acceptance length within 0.15, accepted counts per position within 10% (+3).

    Both run greedy with the same draft on the same prompts; counts can differ only where the
    two implementations disagree on a near-tied argmax, or in how a sequence's last round
    (cut by the token budget or EOS) is counted.
    """
    from speculators_core import load_speculator
    from speculators_core.evaluate.reference import DecodeStats, ReferenceDecoder

    draft = load_speculator(run["folder"], verifier=run["verifier"]).eval()
    decoder = ReferenceDecoder(
        run["model"], draft, k=K, eos_token_ids=[run["tokenizer"].eos_token_id]
    )
    total = DecodeStats(k=K)
    same = 0
    for prompt, vllm_out in zip(run["prompts"], run["speculative"].outputs):
        result = decoder.generate(prompt, max_new_tokens=NEW_TOKENS)
        total.merge(result.stats)
        same += result.tokens == vllm_out
    vllm: VllmResult = run["speculative"]
    detail = (vllm.to_json() | {"outputs": None}, total.to_json(), f"{same}/4 identical outputs")
    print("DETAIL", detail)
    assert abs(vllm.mean_acceptance_length - total.mean_acceptance_length) <= 0.15, detail
    for got, want in zip(vllm.accepted_per_position, total.accepted_per_position):
        assert abs(got - want) <= max(3, 0.1 * want), detail
