"""Within-document alignment and HASS's harmonized-context masks, against plain loops."""

from __future__ import annotations

import pytest
import torch
from speculators_hass.alignment import (
    align_batch,
    document_lengths,
    document_starts,
    hass_attention_mask,
    next_level_features,
)

# Aligned document ids: two documents and padding in row 0 (the last index of each document is
# already -1, as align_batch leaves it), one long document in row 1.
DOCS = torch.tensor(
    [
        [0, 0, 0, 0, -1, 1, 1, 1, -1, -1],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, -1],
    ]
)


def plain_loop_mask(docs: torch.Tensor, step: int) -> torch.Tensor:
    """FORMAT.md 3.5 written out with F = step + 1 levels.

    Level 0 (true features) is a causal block shifted down by F - 1: query r sees key j when
    j <= r - (F - 1). Level k >= 1 (step k-1's predictions) is a diagonal shifted by F - 1 - k:
    query r sees key j = r - (F - 1 - k). Both only inside the query's document. A query outside
    any document sees only its own key of the newest level.
    """
    batch, length = docs.shape
    levels = step + 1
    mask = torch.zeros(batch, 1, length, levels * length, dtype=torch.bool)
    for b in range(batch):
        for r in range(length):
            for level in range(levels):
                for j in range(length):
                    if docs[b, r] < 0:
                        visible = level == step and j == r
                    elif docs[b, j] != docs[b, r]:
                        visible = False
                    elif level == 0:
                        visible = j <= r - (levels - 1)
                    else:
                        visible = j == r - (levels - 1 - level)
                    mask[b, 0, r, level * length + j] = visible
    return mask


@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_mask_matches_plain_loop(step: int) -> None:
    """The dense harmonized-context mask equals the plain-loop derivation at every step."""
    assert torch.equal(hass_attention_mask(DOCS, step), plain_loop_mask(DOCS, step))


def test_mask_documented_example() -> None:
    """One document of 5 indices at step 2: true context up to r-2, then the two own levels."""
    docs = torch.tensor([[0, 0, 0, 0, 0]])
    level0 = torch.tensor(
        [
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
        ],
        dtype=torch.bool,
    )
    below = torch.diag(torch.ones(4, dtype=torch.bool), -1)  # key j = r - 1
    eye = torch.eye(5, dtype=torch.bool)
    expected = torch.cat([level0, below, eye], dim=1)
    assert torch.equal(hass_attention_mask(docs, 2)[0, 0], expected)
    # Step 0 is plain causal attention over the true features.
    assert torch.equal(
        hass_attention_mask(docs, 0)[0, 0], torch.tril(torch.ones(5, 5, dtype=torch.bool))
    )


def test_every_query_sees_at_least_its_own_key() -> None:
    """No row of any step is all-masked (SDPA would return NaN)."""
    for step in range(4):
        assert hass_attention_mask(DOCS, step).any(dim=-1).all()


def test_align_batch_matches_a_loop() -> None:
    """Index t holds x_{t+1}, f_t, f_{t+1}, l_{t+1}, p_t, d_t within its document."""
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 0], [1, 2, 3, 4, 5, 6, 7]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0, 0]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 6]])
    loss_mask = torch.tensor([[0, 1, 1, 0, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    features = torch.randn(2, 7, 1, 4)
    aligned = align_batch(input_ids, features, loss_mask, positions, docs)
    for b in range(2):
        for t in range(7):
            has_next = t + 1 < 7 and docs[b, t] >= 0 and docs[b, t + 1] == docs[b, t]
            assert int(aligned.document_ids[b, t]) == (int(docs[b, t]) if has_next else -1)
            assert int(aligned.input_ids[b, t]) == (int(input_ids[b, t + 1]) if has_next else 0)
            assert bool(aligned.loss_mask[b, t]) == (has_next and bool(loss_mask[b, t + 1]))
            assert int(aligned.position_ids[b, t]) == int(positions[b, t])
            assert torch.equal(aligned.features[b, t], features[b, t, 0])
            expected_target = features[b, t + 1, 0] if has_next else torch.zeros(4)
            assert torch.equal(aligned.target_features[b, t], expected_target)


def test_document_starts_lengths_and_next_level() -> None:
    """Document starts, lengths and the level shift, against loops."""
    docs = torch.tensor([[0, 0, -1, 1, 1, 1, -1, -1], [-1, 0, 0, 0, 1, 1, 2, -1]])
    starts = document_starts(docs)
    lengths = document_lengths(docs)
    level = torch.randn(2, 8, 3)
    prediction = torch.randn(2, 8, 3)
    nxt = next_level_features(level, prediction, starts)
    for b in range(2):
        for t in range(8):
            d = int(docs[b, t])
            first = d >= 0 and (t == 0 or int(docs[b, t - 1]) != d)
            assert bool(starts[b, t]) == first
            assert int(lengths[b, t]) == (int((docs[b] == d).sum()) if d >= 0 else 0)
            expected = level[b, t] if first else (prediction[b, t - 1] if t else level[b, 0])
            assert torch.equal(nxt[b, t], expected)
