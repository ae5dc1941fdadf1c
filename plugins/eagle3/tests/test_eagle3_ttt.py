"""The TTT training forward and training_step, re-derived position by position in the test."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from eagle3_helpers import AUX_IDS, pack_rows, random_samples
from speculators_eagle3 import Eagle3DraftModel

from speculators_core.modeling import KVCache
from speculators_core.train.metrics import derive_metrics

VARIANTS: dict[str, dict[str, Any]] = {
    "llama-draft-vocab": {"draft_vocab_size": 100, "norm_before_residual": True},
    "qwen3-2-layers-norm-before-fc-norm-output": {
        "layer_type": "qwen3",
        "num_layers": 2,
        "norm_before_fc": True,
        "norm_output": True,
        "norm_before_residual": False,
    },
    "llama-2-layers-fc-norm": {"num_layers": 2, "fc_norm": True, "draft_vocab_size": 64},
}


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every draft weight away from its initial value (norms included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("verifier_") or name == "embed_tokens.weight":
                continue
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)


def build(verifier: Path, options: dict[str, Any], counts: torch.Tensor) -> Eagle3DraftModel:
    extra: dict[str, Any] = {"token_counts": counts} if "draft_vocab_size" in options else {}
    model = Eagle3DraftModel.from_verifier(
        verifier, aux_layer_ids=AUX_IDS, attn_implementation="sdpa", **options, **extra
    )
    perturb(model, seed=7)
    return model.eval()


@torch.no_grad()
def rederived_logits(
    model: Eagle3DraftModel,
    ids: torch.Tensor,
    aux: torch.Tensor,
    positions: torch.Tensor,
    t: int,
    steps: int,
) -> list[torch.Tensor]:
    """Draft logits after context index ``t`` of ONE document, by plain sequential drafting.

    ``ids``/``aux``/``positions`` are one unshifted document (``[L]``, ``[L, n*Ht]``, ``[L]``).
    Step 0 runs the draft over indices 0..t (index i reads x_{i+1} and g_i at position
    p_i + 1) with a causal mask; step k feeds the true token x_{t+1+k} and step k-1's state at
    position p_t + 1 + k, attending to everything cached so far.
    """
    cache = KVCache(len(model.layers))
    n = t + 1
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
    feature = model.combine_aux(aux[None, :n])
    h = model.decode(
        ids[None, 1 : n + 1],
        feature,
        positions[None, :n] + 1,
        cache=cache,
        mask=causal,
        implementation="eager",
    )
    logits, state = model.head(h[:, -1:])
    out = [logits[0, 0]]
    for k in range(1, steps):
        h = model.decode(
            ids[None, t + 1 + k : t + 2 + k],
            state,
            positions[None, t : t + 1] + 1 + k,
            cache=cache,
            mask=None,
            implementation="eager",
        )
        logits, state = model.head(h)
        out.append(logits[0, 0])
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ttt_forward_equals_sequential_drafting(
    tiny_verifier: Path, verifier_model: Any, variant: str
) -> None:
    """Every step's logits at every position equal drafting that position from scratch."""
    counts = torch.arange(verifier_model.config.vocab_size) % 17
    model = build(tiny_verifier, VARIANTS[variant], counts)
    samples = random_samples(verifier_model, [*AUX_IDS, 4], [9, 7, 12], seed=3)
    batch = pack_rows(samples, row_length=18)  # rows: [9, 7, pad 2], [12, pad 6]
    from speculators_eagle3.alignment import align_batch

    aligned = align_batch(**batch)
    steps = 3
    all_logits = model.ttt_forward(
        aligned.aux_hidden_states,
        aligned.input_ids,
        aligned.document_ids,
        aligned.position_ids,
        steps=steps,
    )
    checked = 0
    for row in range(batch["input_ids"].shape[0]):
        docs = batch["document_ids"][row]
        for doc in range(int(docs.max()) + 1):
            where = (docs == doc).nonzero()[:, 0]
            start, length = int(where[0]), where.shape[0]
            ids = batch["input_ids"][row, start : start + length]
            aux = aligned.aux_hidden_states[row, start : start + length]
            positions = batch["position_ids"][row, start : start + length]
            for t in range(length - 1):
                reachable = min(steps, length - 1 - t)  # step s needs x_{t+1+s}
                expected = rederived_logits(model, ids, aux, positions, t, reachable)
                for step in range(reachable):
                    torch.testing.assert_close(
                        all_logits[step][row, start + t], expected[step], rtol=1e-4, atol=1e-5
                    )
                    checked += 1
    assert checked > 50


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_step_losses_match_plain_loop(
    tiny_verifier: Path, verifier_model: Any, variant: str
) -> None:
    """Per-step losses and accuracies equal a plain loop over positions with independent targets.

    Targets come straight from the verifier model (final norm, LM head, columns of the draft
    vocabulary); draft logits from sequential drafting of each position.
    """
    counts = torch.arange(verifier_model.config.vocab_size) % 17
    model = build(tiny_verifier, VARIANTS[variant], counts)
    samples = random_samples(verifier_model, [*AUX_IDS, 4], [8, 11], seed=5)
    batch = pack_rows(samples, row_length=20)
    out = model.training_step(batch)
    vocab_ids = model.draft_to_target_ids()
    steps = model.ttt_steps
    assert steps == 3

    kl_sums = [0.0] * steps
    counts_s = [0] * steps
    hits = [0] * steps
    survived = [0] * steps
    for sample in samples:
        ids, states, mask = sample["input_ids"], sample["hidden_states"], sample["loss_mask"]
        length = ids.shape[0]
        aux = states[:, :-1].flatten(1)
        with torch.no_grad():
            verifier_logits = verifier_model.lm_head(verifier_model.model.norm(states[:, -1]))
        targets = verifier_logits[:, vocab_ids]  # [L, Vd]: target of aligned index i is row i+1
        positions = torch.arange(length)
        for t in range(length - 1):
            reachable = min(steps, length - 1 - t)
            logits = rederived_logits(model, ids, aux, positions, t, reachable)
            alive = True
            for step in range(reachable):
                target = targets[t + step + 1]
                correct = int(logits[step].argmax()) == int(target.argmax())
                was_alive, alive = alive, alive and correct
                if not bool(mask[t + step + 1]):
                    continue
                p = torch.softmax(target.double(), 0)
                log_q = torch.log_softmax(logits[step].double(), 0)
                kl_sums[step] += float((p * (p.log() - log_q)).sum())
                counts_s[step] += 1
                hits[step] += alive
                survived[step] += was_alive
    total = 0.0
    for step in range(steps):
        loss = kl_sums[step] / counts_s[step]
        total += loss
        assert out.metrics[f"loss_{step}"].item() == pytest.approx(loss, rel=1e-4)
        assert out.metrics[f"full_acc_{step}"].item() == pytest.approx(hits[step] / counts_s[step])
        assert out.metrics[f"cond_acc_{step}"].item() == pytest.approx(
            hits[step] / max(survived[step], 1)
        )
        assert int(out.weights[f"loss_{step}"]) == counts_s[step]
    assert out.loss.item() == pytest.approx(total, rel=1e-4)
    assert math.isfinite(derive_metrics(out).metrics["est_accept_len"].item())


def test_noise_only_in_training_mode(tiny_verifier: Path, verifier_model: Any) -> None:
    """Noise augmentation changes the loss in train mode only; eval is deterministic."""
    model = Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS, noise_std=0.5)
    batch = pack_rows(random_samples(verifier_model, [*AUX_IDS, 4], [10], seed=9), 10)
    model.eval()
    a, b = model.training_step(batch).loss, model.training_step(batch).loss
    assert a.item() == b.item()
    model.train()
    torch.manual_seed(0)
    c = model.training_step(batch).loss
    assert c.item() != a.item()
    model.configure_training(noise_std=0.0)
    assert model.training_step(batch).loss.item() == pytest.approx(a.item(), rel=1e-6)
