"""An objective through a frozen head, chunk by chunk: against plain autograd on the logits."""

from __future__ import annotations

import pytest
import torch

from speculators_core import SpeculatorsError
from speculators_core.head_loss import head_objective
from speculators_core.objectives import TargetDistribution, resolve_objective

N, H, V, U = 11, 6, 13, 9


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, TargetDistribution, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).float()
    weight = torch.randn(V, H, generator=g)
    target = TargetDistribution.from_logits(torch.randn(U, V, generator=g) * 2)
    index = torch.randint(0, U, (N,), generator=g)
    return hidden, weight, target, index


@pytest.mark.parametrize("spec", ["kl", "rkl", "kl=0.5,jsd=0.3,ce=0.2", "lk"])
@pytest.mark.parametrize("chunk_rows", [1, 4, N])
def test_values_argmax_and_gradient_match_plain_autograd(spec: str, chunk_rows: int) -> None:
    """Loss per row, argmax and d(sum g_i loss_i)/d hidden equal plain autograd through
    ``hidden @ weight.T`` and the objective on whole tensors, for any chunking."""
    objective = resolve_objective(spec)
    hidden, weight, target, index = _inputs(1)
    scale = torch.rand(N, generator=torch.Generator().manual_seed(2)) + 0.5

    plain_hidden = hidden.clone().requires_grad_(True)
    logits = plain_hidden @ weight.T
    expected = objective.plain(logits, target.take(index))
    (expected * scale).sum().backward()

    fused_hidden = hidden.clone().requires_grad_(True)
    values, argmax = head_objective(
        fused_hidden, weight, objective.plain, target, index, chunk_elements=chunk_rows * V
    )
    (values * scale).sum().backward()

    torch.testing.assert_close(values, expected.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(argmax, logits.detach().argmax(dim=-1))
    assert fused_hidden.grad is not None and plain_hidden.grad is not None
    # fp32 throughout (objectives compute in fp32): summation order differs by chunk.
    torch.testing.assert_close(fused_hidden.grad, plain_hidden.grad, rtol=1e-4, atol=1e-5)


def test_rows_in_order_without_index_and_no_grad() -> None:
    """Without ``index`` row ``i`` meets target row ``i``; without a gradient nothing is kept."""
    objective = resolve_objective("kl")
    hidden, weight, target, _ = _inputs(3)
    rows = hidden[:U]
    values, argmax = head_objective(rows, weight, objective.plain, target, chunk_elements=2 * V)
    logits = rows @ weight.T
    torch.testing.assert_close(values, objective.plain(logits, target), rtol=1e-5, atol=1e-6)
    assert torch.equal(argmax, logits.argmax(dim=-1))
    assert not values.requires_grad
    empty, empty_ids = head_objective(rows[:0], weight, objective.plain, target)
    assert empty.shape == (0,) and empty_ids.shape == (0,)


def test_a_trainable_head_is_refused() -> None:
    """The gradient of a trainable head is not computed: one clear error, not a silent zero."""
    hidden, weight, target, _ = _inputs(4)
    with pytest.raises(SpeculatorsError, match="this head trains"):
        head_objective(hidden, weight.requires_grad_(True), resolve_objective("kl").plain, target)


@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
def test_target_distribution_from_head_in_chunks(chunk_rows: int) -> None:
    """``from_head`` equals ``from_logits`` of the whole head output; ``probs`` is its exp."""
    hidden, weight, _, _ = _inputs(5)
    head = lambda x: x @ weight.T  # noqa: E731
    whole = TargetDistribution.from_logits(head(hidden))
    chunked = TargetDistribution.from_head(hidden, head, V, chunk_elements=chunk_rows * V)
    torch.testing.assert_close(chunked.log_probs, whole.log_probs)
    assert torch.equal(chunked.ids, whole.ids)
    torch.testing.assert_close(chunked.probs, whole.log_probs.exp())
    assert torch.allclose(chunked.probs.sum(-1), torch.ones(N))
