"""A tiny EAGLE-3 draft learns a tiny verifier: held-out loss falls, step-0 accuracy rises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from eagle3_helpers import AUX_IDS, pack_rows, random_samples
from speculators_eagle3 import Eagle3DraftModel

from speculators_core.train.metrics import derive_metrics


def test_training_lowers_held_out_loss_and_raises_step0_accuracy(
    tiny_verifier: Path, verifier_model: Any
) -> None:
    """A plain AdamW loop over packed batches improves every held-out figure that matters."""
    generator = torch.Generator().manual_seed(0)
    spec = [*AUX_IDS, 4]
    lengths = torch.randint(20, 40, (96,), generator=generator).tolist()
    train = random_samples(verifier_model, spec, lengths, seed=1)
    held_out = pack_rows(random_samples(verifier_model, spec, [32] * 16, seed=2), 128)
    counts = torch.zeros(verifier_model.config.vocab_size, dtype=torch.long)
    for sample in train:
        counts += torch.bincount(sample["input_ids"], minlength=counts.shape[0])

    torch.manual_seed(0)
    model = Eagle3DraftModel.from_verifier(
        tiny_verifier, aux_layer_ids=AUX_IDS, draft_vocab_size=160, token_counts=counts
    )
    assert model.hidden_state_spec().layer_ids == tuple(spec)

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            metrics = derive_metrics(model.training_step(held_out)).metrics
        model.train()
        return {key: value.item() for key, value in metrics.items()}

    before = evaluate()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _epoch in range(6):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(train), 8):
            batch = pack_rows([train[i] for i in order[start : start + 8]], 128)
            out = model.training_step(batch)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    after = evaluate()

    assert after["loss"] < 0.6 * before["loss"], (before["loss"], after["loss"])
    for step in range(3):
        assert after[f"loss_{step}"] < before[f"loss_{step}"]
    assert after["full_acc_0"] > before["full_acc_0"] + 0.08, (before, after)
    assert after["est_accept_len"] > before["est_accept_len"]
