"""The loss plan (which rows each TTT step reads) and the KL's hand-written gradient."""

from __future__ import annotations

import pytest
import torch
from speculators_eagle3.loss import forward_kl, plan_ttt_loss, step_valid_mask, ttt_loss

DOCS = torch.tensor(
    [
        [0, 0, 0, 0, -1, 1, 1, 1, 1, 1, -1, -1],
        [2, 2, 2, 2, 2, 2, 2, 2, -1, 3, 3, -1],
    ]
)
MASK = torch.tensor(
    [
        [0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 0, 0],
        [1, 0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0],
    ],
    dtype=torch.bool,
)


def plain_valid(b: int, t: int, step: int) -> bool:
    """FORMAT.md 3.3: t is scored at ``step`` when t + step is in t's document and supervised."""
    u = t + step
    length = DOCS.shape[1]
    return u < length and int(DOCS[b, t]) >= 0 and DOCS[b, u] == DOCS[b, t] and bool(MASK[b, u])


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_plan_rows_are_the_positions_a_step_or_a_later_one_scores(steps: int) -> None:
    """rows[s]: t scored at some step >= s; targets: exactly rows[s] + s, indexed consistently."""
    plan = plan_ttt_loss(DOCS, MASK, steps)
    rows, length = DOCS.shape
    wanted_targets = set()
    for step in range(steps):
        expected = [
            b * length + t
            for b in range(rows)
            for t in range(length)
            if any(plain_valid(b, t, later) for later in range(step, steps))
        ]
        assert plan.rows[step].tolist() == expected
        valid = [plain_valid(b, t, step) for b in range(rows) for t in range(length)]
        assert plan.valid[step].tolist() == valid
        assert torch.equal(step_valid_mask(DOCS, MASK, step).reshape(-1), plan.valid[step])
        wanted_targets |= {r + step for r in expected}
        targets = plan.target_rows[plan.target_index[step]]
        assert targets.tolist() == [r + step for r in expected]
    assert plan.target_rows.tolist() == sorted(wanted_targets)


def test_forward_kl_value_and_gradient_match_autograd_of_the_formula() -> None:
    """KL(p || q) per row and its gradient equal autograd through the written-out formula."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 11, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randn(5, 11, generator=generator, dtype=torch.float64) * 3
    weights = torch.rand(5, generator=generator, dtype=torch.float64)
    got = forward_kl(logits, targets)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), logits)

    reference = logits.detach().clone().requires_grad_()
    p = torch.softmax(targets, dim=-1)
    expected = (p * (p.log() - torch.log_softmax(reference, dim=-1))).sum(-1)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), reference)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-6, atol=1e-8)
    assert got_grad.dtype == logits.dtype


def test_ttt_loss_gradient_flows_only_through_scored_positions() -> None:
    """Draft logits of positions no step scores get no gradient; scored ones do."""
    generator = torch.Generator().manual_seed(4)
    steps, vocab = 3, 6
    logits = [
        torch.randn(2, 12, vocab, generator=generator, requires_grad=True) for _ in range(steps)
    ]
    targets = torch.randn(2, 12, vocab, generator=generator)
    ttt_loss(logits, targets, DOCS, MASK).loss.backward()
    for step, step_logits in enumerate(logits):
        assert step_logits.grad is not None
        touched = step_logits.grad.abs().sum(-1) > 0
        scored = torch.tensor(
            [[plain_valid(b, t, step) for t in range(12)] for b in range(2)], dtype=torch.bool
        )
        assert torch.equal(touched, scored)
