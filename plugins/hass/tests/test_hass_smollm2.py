"""The product test on real data: a HASS draft trained briefly on SmolLM2 states drafts better.

ShareGPT conversations (training split for training, the fixed held-out split for evaluation)
are rendered with SmolLM2's chat template and loss masks, and SmolLM2's final post-norm hidden
states are captured with the core's data pipeline, exactly as ``speculators data`` does for the
spec the plugin asks for. A fresh draft is then trained for one short epoch with HASS's three
steps; its held-out step-0 accuracy (drafted token == SmolLM2's greedy token) must clearly beat
the untrained draft's, and every step's distribution losses must fall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hass_helpers import pack
from speculators_hass import EagleDraftModel

from speculators_core.testing import evaluation_metrics, train_on_samples

pytestmark = pytest.mark.slow

MAX_TOKENS = 96  # per sample: short samples keep capture (the costly part) to about a minute
TRAIN_SAMPLES = 24
HELD_OUT_SAMPLES = 8


def render_split(verifier: Path, split: str, count: int) -> list[Any]:
    """The first ``count`` usable conversations of a ShareGPT split, rendered and masked."""
    from speculators_core.assets import sharegpt_records
    from speculators_core.data import ChatRenderer, normalize_record
    from speculators_core.data.conversations import SkipRecord

    renderer = ChatRenderer.from_verifier(verifier, seq_length=MAX_TOKENS)
    rendered = []
    for record in sharegpt_records(split):  # type: ignore[arg-type]
        try:
            sample = renderer(normalize_record(record))
        except SkipRecord:
            continue
        if sample.num_supervised >= 16:  # enough answer tokens left after truncation
            rendered.append(sample)
        if len(rendered) == count:
            return rendered
    raise AssertionError(f"ShareGPT split {split} has fewer than {count} usable samples")


@pytest.fixture(scope="module")
def smollm2_samples() -> tuple[Path, list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """SmolLM2, and training / held-out samples with its captured final post-norm states."""
    from speculators_core.assets import MissingPackageError, smollm2_path
    from speculators_core.data import HiddenStateCapture, spec_for_algorithm

    try:
        verifier = smollm2_path()
    except MissingPackageError as err:
        pytest.skip(str(err))
    spec = spec_for_algorithm("eagle", verifier)  # asks the installed plugin
    capture = HiddenStateCapture.from_verifier(verifier, spec)

    def samples(split: str, count: int) -> list[dict[str, torch.Tensor]]:
        rendered = render_split(verifier, split, count)
        ids = [torch.tensor(s.input_ids) for s in rendered]
        states = []
        for start in range(0, len(ids), 8):
            states += capture.capture_batch(ids[start : start + 8])
        return [
            {"input_ids": i, "loss_mask": torch.tensor(s.loss_mask), "hidden_states": h}
            for i, s, h in zip(ids, rendered, states)
        ]

    return verifier, samples("train", TRAIN_SAMPLES), samples("heldout", HELD_OUT_SAMPLES)


def test_brief_training_raises_held_out_step0_accuracy(smollm2_samples: Any) -> None:
    """One short epoch (12 AdamW steps) beats the untrained draft on held-out conversations."""
    verifier, train, held_out = smollm2_samples
    assert train[0]["hidden_states"].shape[1:] == (1, 576)
    torch.manual_seed(0)
    draft = EagleDraftModel.from_verifier(verifier)  # HASS defaults: 3 steps, published weights
    held_out_batch = pack(held_out, 2 * MAX_TOKENS * 4)
    before = evaluation_metrics(draft, held_out_batch)
    train_on_samples(
        draft,
        train,
        lambda samples: pack(samples, 2 * MAX_TOKENS),
        epochs=1,
        batch_size=2,
        lr=1e-3,
        betas=(0.9, 0.95),
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    after = evaluation_metrics(draft, held_out_batch)
    print("held-out before", before, "after", after)
    assert after["cond_acc_0"] > before["cond_acc_0"] + 0.04, (before, after)
    assert after["loss"] < before["loss"]
    assert after["vloss_0"] < before["vloss_0"]
    for step in range(3):
        assert after[f"ploss_{step}"] < before[f"ploss_{step}"]
        assert after[f"topk_loss_{step}"] < before[f"topk_loss_{step}"]
