"""The training step's shortcuts change nothing: trimmed padding, logit rows, the split kernel."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from eagle3_helpers import AUX_IDS, pack_rows, random_samples
from speculators_eagle3 import Eagle3DraftModel
from speculators_eagle3.alignment import align_batch
from speculators_eagle3.loss import plan_ttt_loss


def make_model(verifier: Path, implementation: str, **options: Any) -> Eagle3DraftModel:
    """A draft whose weights are all moved off their initial values (same seed every time)."""
    model = Eagle3DraftModel.from_verifier(
        verifier, aux_layer_ids=AUX_IDS, attn_implementation=implementation, **options
    )
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def step_and_grads(
    model: Eagle3DraftModel, batch: dict[str, torch.Tensor]
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model.training_step(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {key: value.item() for key, value in out.metrics.items()}
    metrics.update({f"weight:{key}": float(value) for key, value in out.weights.items()})
    return metrics, grads


def assert_same_step(
    a: tuple[dict[str, float], dict[str, torch.Tensor]],
    b: tuple[dict[str, float], dict[str, torch.Tensor]],
) -> None:
    assert a[0].keys() == b[0].keys()
    for key in a[0]:
        assert a[0][key] == pytest.approx(b[0][key], rel=1e-5, abs=1e-6), key
    assert a[1].keys() == b[1].keys() and len(a[1]) > 5
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_padding_does_not_change_the_training_step(
    tiny_verifier: Path, verifier_model: Any
) -> None:
    """The same documents in tight rows and in rows of mostly padding: same loss, metrics, grads."""
    samples = random_samples(verifier_model, [*AUX_IDS, 4], [9, 6, 12], seed=21)
    model = make_model(tiny_verifier, "sdpa", draft_vocab_size=90, token_counts=torch.arange(259))
    tight = pack_rows(samples, row_length=15)  # rows [9, 6] and [12, pad 3]
    padded = pack_rows(samples, row_length=40)  # one row [9, 6, 12, pad 13]
    padded_twice = {
        key: torch.cat([value, value.new_zeros(value.shape)], 0) for key, value in padded.items()
    }
    padded_twice["document_ids"][1] = -1  # a second row of nothing but padding
    assert_same_step(step_and_grads(model, tight), step_and_grads(model, padded))
    assert_same_step(step_and_grads(model, padded), step_and_grads(model, padded_twice))


@pytest.mark.parametrize(
    "options",
    [{}, {"num_layers": 2, "norm_output": True, "layer_type": "qwen3"}],
    ids=["llama", "qwen3-2-layers-norm-output"],
)
def test_split_sdpa_and_dense_eager_training_steps_agree(
    tiny_verifier: Path, verifier_model: Any, options: dict[str, Any]
) -> None:
    """SDPA on the CPU (split kernel) and eager (dense masks) give the same step and gradients."""
    samples = random_samples(verifier_model, [*AUX_IDS, 4], [10, 2, 7, 13], seed=22)
    batch = pack_rows(samples, row_length=24)  # a document of 2 positions: alone after the shift
    split = step_and_grads(make_model(tiny_verifier, "sdpa", **options), batch)
    dense = step_and_grads(make_model(tiny_verifier, "eager", **options), batch)
    assert_same_step(split, dense)


@pytest.mark.parametrize("norm_output", [False, True])
def test_ttt_forward_logit_rows_are_rows_of_the_full_logits(
    tiny_verifier: Path, verifier_model: Any, norm_output: bool
) -> None:
    """``logit_rows`` returns exactly the named rows of every step's full logits."""
    samples = random_samples(verifier_model, [*AUX_IDS, 4], [8, 11, 5], seed=23)
    aligned = align_batch(**pack_rows(samples, row_length=20))
    model = make_model(tiny_verifier, "sdpa", norm_output=norm_output)
    inputs = (
        aligned.aux_hidden_states,
        aligned.input_ids,
        aligned.document_ids,
        aligned.position_ids,
    )
    plan = plan_ttt_loss(aligned.document_ids, aligned.loss_mask, 3)
    with torch.no_grad():
        full = model.ttt_forward(*inputs, steps=3)
        rows = model.ttt_forward(*inputs, steps=3, logit_rows=plan.rows)
    for step in range(3):
        assert rows[step].shape == (plan.rows[step].numel(), full[step].shape[-1])
        expected = full[step].flatten(0, 1)[plan.rows[step]]
        torch.testing.assert_close(rows[step], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["kl", "kl=0.5,jsd=0.3,ce=0.2"])
def test_frozen_head_loss_equals_scoring_the_logits(
    tiny_verifier: Path, verifier_model: Any, monkeypatch: pytest.MonkeyPatch, objective: str
) -> None:
    """With the LM head frozen the step scores final states through the head a chunk of rows
    at a time (``ttt_loss_states``); a trainable head scores whole logits (``ttt_loss_rows``).
    Same loss, metrics and gradients of every other parameter."""
    import speculators_core.head_loss as head_loss
    import speculators_core.objectives as objectives

    # Chunks of 7 rows for the head, 5 for the targets: several per step at these sizes.
    monkeypatch.setattr(head_loss, "HEAD_CHUNK_ELEMENTS", 7 * 90)
    monkeypatch.setattr(objectives, "LEAN_CHUNK_ELEMENTS", 5 * 90)
    samples = random_samples(verifier_model, [*AUX_IDS, 4], [9, 14, 6], seed=24)
    batch = pack_rows(samples, row_length=32)
    options = {"draft_vocab_size": 90, "token_counts": torch.arange(259), "objective": objective}
    frozen = make_model(tiny_verifier, "sdpa", **options)
    trained = copy.deepcopy(frozen)
    trained.configure_training(train_lm_head=True)
    assert not frozen.lm_head.weight.requires_grad and trained.lm_head.weight.requires_grad
    via_states = step_and_grads(frozen, batch)
    via_logits = step_and_grads(trained, batch)
    del via_logits[1]["lm_head.weight"]
    assert_same_step(via_states, via_logits)


def test_compacted_frozen_embedding_changes_nothing(
    tiny_verifier: Path, verifier_model: Any
) -> None:
    """A frozen embedding of bf16 values stored in bf16 (what the trainer does): the same step,
    bit for bit; a trainable one (P-EAGLE's default, ``embed_requires_grad``) stays fp32."""
    samples = random_samples(verifier_model, [*AUX_IDS, 4], [9, 14, 6], seed=25)
    batch = pack_rows(samples, row_length=32)
    wide = make_model(tiny_verifier, "sdpa")
    with torch.no_grad():
        wide.embed_tokens.weight.copy_(wide.embed_tokens.weight.bfloat16().float())
    narrow = copy.deepcopy(wide)
    assert narrow.compact_frozen_parts() == wide.embed_tokens.weight.numel() * 2
    assert narrow.embed_tokens.weight.dtype == torch.bfloat16
    (loss_a, grads_a), (loss_b, grads_b) = (
        step_and_grads(wide, batch),
        step_and_grads(narrow, batch),
    )
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[name], grads_b[name]) for name in grads_a)
    trained = make_model(tiny_verifier, "sdpa", embed_requires_grad=True)
    assert trained.compact_frozen_parts() == 0
    assert trained.embed_tokens.weight.dtype == torch.float32
