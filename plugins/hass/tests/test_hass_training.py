"""The HASS training forward and training_step, re-derived position by position in the test."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hass_helpers import draft_from_scratch, pack, perturb, random_samples
from speculators_hass import EagleDraftModel
from speculators_hass.alignment import align_batch

from speculators_core.testing import evaluation_metrics, packed_documents, train_on_samples

VARIANTS: dict[str, dict[str, Any]] = {
    "eagle": {},
    "layernorms-fusion-bias": {"layernorms": True, "fusion_bias": True},
    "feature-norm-before-fc": {"layernorms": True, "feature_norm_before_fc": True},
}


def build(verifier: Path, options: dict[str, Any]) -> EagleDraftModel:
    model = EagleDraftModel.from_verifier(verifier, attn_implementation="sdpa", **options)
    perturb(model, seed=7)
    return model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_s_equals_drafting_with_s_own_predictions(
    tiny_verifier: Path, verifier_model: Any, variant: str
) -> None:
    """Step s at index r equals drafting from scratch after a true context ending at r - s.

    Within a document starting at index a, the context cannot start before a: step s at r then
    equals min(s, r - a) own predictions after a true context ending at max(a, r - s).
    """
    model = build(tiny_verifier, VARIANTS[variant])
    samples = random_samples(verifier_model, [9, 7, 12], seed=3)
    batch = pack(samples, row_length=18)  # rows: [9, 7, pad 2], [12, pad 6]
    aligned = align_batch(**batch)
    steps = 4
    predictions = model.hass_forward(
        aligned.features,
        aligned.input_ids,
        aligned.document_ids,
        aligned.position_ids,
        steps=steps,
    )
    checked = 0
    for row, start, length in packed_documents(batch["document_ids"]):
        tokens = batch["input_ids"][row, start : start + length]
        features = batch["hidden_states"][row, start : start + length, 0]
        positions = batch["position_ids"][row, start : start + length]
        for r in range(length - 1):  # the last index of a document reads no next token
            for step in range(steps):
                own = min(step, r)
                expected = draft_from_scratch(model, tokens, features, positions, r - own, own)
                torch.testing.assert_close(
                    predictions[step][row, start + r], expected, rtol=1e-4, atol=1e-5
                )
                checked += 1
    assert checked == steps * (8 + 6 + 11)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_step_matches_plain_loop(
    tiny_verifier: Path, verifier_model: Any, variant: str
) -> None:
    """Per-step losses and accuracies equal a plain loop with targets straight from the verifier.

    Targets: the verifier model's own LM head on the next position's post-norm feature (its
    ``output_hidden_states[-1]``); predictions: drafting from scratch.
    """
    model = build(tiny_verifier, VARIANTS[variant])
    samples = random_samples(verifier_model, [8, 11], seed=5)
    batch = pack(samples, row_length=20)
    out = model.training_step(batch)
    steps = model.hass_steps
    assert steps == 3
    sums = {name: [0.0] * steps for name in ("vloss", "ploss", "topk_loss", "cond_acc")}
    count = 0
    for sample in samples:
        ids, mask = sample["input_ids"], sample["loss_mask"]
        with torch.no_grad():
            hidden = verifier_model(ids[None], output_hidden_states=True).hidden_states[-1][0]
            verifier_logits = verifier_model.lm_head(hidden)  # [L, V]
        positions = torch.arange(ids.shape[0])
        for t in range(ids.shape[0] - 1):
            if not mask[t + 1]:
                continue
            count += 1
            p = torch.softmax(verifier_logits[t + 1].double(), 0)
            top = p.argsort(descending=True)[:10]
            for step in range(steps):
                own = min(step, t)
                predicted = draft_from_scratch(model, ids, hidden, positions, t - own, own)
                with torch.no_grad():
                    log_q = torch.log_softmax(model.head(predicted).double(), 0)
                diff = (predicted - hidden[t + 1]).double().abs()
                huber = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
                sums["vloss"][step] += float(huber)
                sums["ploss"][step] += float(-(p * log_q).sum())
                sums["topk_loss"][step] += float(-(p[top] * log_q[top]).sum())
                sums["cond_acc"][step] += float(int(log_q.argmax()) == int(p.argmax()))
    total = 0.0
    for step in range(steps):
        for name in sums:
            value = sums[name][step] / count
            assert out.metrics[f"{name}_{step}"].item() == pytest.approx(value, rel=2e-4, abs=1e-6)
            assert int(out.weights[f"{name}_{step}"]) == count
        total += sums["vloss"][step] / count + 0.1 * sums["ploss"][step] / count
        total += sums["topk_loss"][step] / count
    assert out.loss.item() == pytest.approx(total, rel=2e-4)
    assert out.metrics["loss"].item() == pytest.approx(total, rel=2e-4)


def test_noise_follows_hass_scaling(
    tiny_verifier: Path, verifier_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training mode adds (rand - 0.5) * std * 512 / document length to input features only."""
    model = EagleDraftModel.from_verifier(tiny_verifier, noise_std=0.3)
    samples = random_samples(verifier_model, [6, 10], seed=9)
    batch = pack(samples, row_length=20)
    seen: dict[str, torch.Tensor] = {}
    original = model.hass_forward

    def record(features: torch.Tensor, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        seen["features"] = features.clone()
        return original(features, *args, **kwargs)

    monkeypatch.setattr(model, "hass_forward", record)
    eval_loss = model.eval().training_step(batch).loss
    assert torch.equal(seen["features"], batch["hidden_states"][:, :, 0])
    model.train()
    monkeypatch.setattr(torch, "rand_like", torch.ones_like)  # rand - 0.5 == 0.5 everywhere
    train_loss = model.training_step(batch).loss
    expected = batch["hidden_states"][:, :, 0].clone()
    expected[0, :6] += 0.5 * 0.3 * 512 / 6
    expected[0, 6:16] += 0.5 * 0.3 * 512 / 10
    torch.testing.assert_close(seen["features"], expected)
    assert train_loss.item() != eval_loss.item()
    monkeypatch.undo()
    model.configure_training(noise_std=0.0)
    assert model.training_step(batch).loss.item() == pytest.approx(eval_loss.item(), rel=1e-6)


def test_training_lowers_held_out_loss_and_raises_step0_accuracy(
    tiny_verifier: Path, verifier_model: Any
) -> None:
    """A plain AdamW loop over packed batches improves the held-out losses and accuracy."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 40, (96,), generator=generator).tolist()
    train = random_samples(verifier_model, lengths, seed=1)
    held_out = pack(random_samples(verifier_model, [32] * 16, seed=2), 128)
    torch.manual_seed(0)
    model = EagleDraftModel.from_verifier(tiny_verifier, noise_std=0.0)
    before = evaluation_metrics(model, held_out)
    train_on_samples(
        model,
        train,
        lambda samples: pack(samples, 128),
        epochs=6,
        batch_size=8,
        lr=3e-3,
        generator=generator,
    )
    after = evaluation_metrics(model, held_out)
    # The tiny verifier's distributions are nearly uniform, so ploss is mostly its entropy
    # (log 259 = 5.56) and moves little; the feature regression and the accuracy move a lot.
    assert after["loss"] < before["loss"], (before["loss"], after["loss"])
    assert after["vloss_0"] < 0.8 * before["vloss_0"], (before, after)
    for step in range(3):
        assert after[f"vloss_{step}"] < before[f"vloss_{step}"]
        assert after[f"ploss_{step}"] < before[f"ploss_{step}"]
        assert after[f"topk_loss_{step}"] < before[f"topk_loss_{step}"]
    assert after["cond_acc_0"] > before["cond_acc_0"] + 0.08, (before, after)
    assert math.isfinite(after["cond_acc_2"])
