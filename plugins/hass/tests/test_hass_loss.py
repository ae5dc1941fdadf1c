"""Each HASS loss term and metric, against a position-by-position derivation in plain Python."""

from __future__ import annotations

import math

import pytest
import torch
from speculators_hass.loss import HassLossWeights, hass_loss

from speculators_core import SpeculatorsError


def smooth_l1(d: float) -> float:
    """Huber with beta 1: 0.5 d^2 inside [-1, 1], |d| - 0.5 outside."""
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def reference(
    predictions: list[torch.Tensor],
    targets: torch.Tensor,
    valid: torch.Tensor,
    head: torch.Tensor,
    target_head: torch.Tensor,
    weights: HassLossWeights,
) -> dict[str, float]:
    """The HASS terms with lists and math only (FORMAT.md 3.5, HASS's compute_loss)."""
    out: dict[str, float] = {}
    cells = [(b, t) for b in range(valid.shape[0]) for t in range(valid.shape[1]) if valid[b, t]]
    n = len(cells)
    total = 0.0
    for step, prediction in enumerate(predictions):
        vsum = psum = ksum = hits = 0.0
        for b, t in cells:
            pred = prediction[b, t].tolist()
            target = targets[b, t].tolist()
            vsum += sum(smooth_l1(x - y) for x, y in zip(pred, target)) / len(pred)
            p = softmax((target_head @ targets[b, t]).tolist())
            q_logits = (head @ prediction[b, t]).tolist()
            q = softmax(q_logits)
            cross = [-pv * math.log(qv) for pv, qv in zip(p, q)]
            psum += sum(cross)
            top = sorted(range(len(p)), key=lambda v: -p[v])[: weights.topk]
            ksum += sum(cross[v] for v in top)
            hits += max(range(len(q)), key=lambda v: q[v]) == max(range(len(p)), key=lambda v: p[v])
        out[f"vloss_{step}"] = vsum / n
        out[f"ploss_{step}"] = psum / n
        out[f"topk_loss_{step}"] = ksum / n
        out[f"cond_acc_{step}"] = hits / n
        total += weights.v_w * vsum / n + weights.p_w * psum / n + weights.topk_w * ksum / n
    out["loss"] = total
    out["count"] = n
    return out


@pytest.mark.parametrize(
    "weights",
    [HassLossWeights(), HassLossWeights(v_w=0.5, p_w=2.0, topk_w=0.0, topk=3)],
    ids=["published", "other"],
)
def test_loss_terms_match_plain_derivation(weights: HassLossWeights) -> None:
    """vloss, ploss, topk_loss, acc and the weighted sum over steps equal the plain loop."""
    generator = torch.Generator().manual_seed(0)
    batch, length, hidden, vocab, steps = 2, 6, 5, 17, 3
    # Scales that put some feature differences outside SmoothL1's quadratic zone.
    targets = torch.randn(batch, length, hidden, generator=generator) * 1.5
    predictions = [
        targets + torch.randn(batch, length, hidden, generator=generator) * (0.4 + s)
        for s in range(steps)
    ]
    valid = torch.rand(batch, length, generator=generator) > 0.3
    head = torch.randn(vocab, hidden, generator=generator)
    target_head = head + 0.1 * torch.randn(vocab, hidden, generator=generator)
    out = hass_loss(
        predictions,
        targets,
        valid,
        head=lambda x: x @ head.T,
        target_head=lambda x: x @ target_head.T,
        weights=weights,
    )
    expected = reference(predictions, targets, valid, head, target_head, weights)
    for key, value in out.metrics.items():
        assert value.item() == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
        assert int(out.weights[key]) == expected["count"]
    assert set(out.metrics) == {
        f"{name}_{s}" for name in ("vloss", "ploss", "topk_loss", "cond_acc") for s in range(steps)
    } | {"loss"}
    assert out.loss.item() == pytest.approx(expected["loss"], rel=1e-5)


def test_gradient_of_the_sum_equals_per_step_backward() -> None:
    """One backward of the summed loss gives HASS's accumulated per-step gradients."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 4, generator=generator, requires_grad=True)
    inputs = [torch.randn(1, 5, 4, generator=generator) for _ in range(3)]
    targets = torch.randn(1, 5, 4, generator=generator)
    valid = torch.ones(1, 5, dtype=torch.bool)
    head = torch.randn(9, 4, generator=generator)

    def run(steps: list[torch.Tensor]) -> torch.Tensor:
        return hass_loss(
            [x @ weight for x in steps],
            targets,
            valid,
            head=lambda x: x @ head.T,
            target_head=lambda x: x @ head.T,
            weights=HassLossWeights(),
        ).loss

    run(inputs).backward()
    assert weight.grad is not None
    summed = weight.grad.clone()
    weight.grad = None
    for x in inputs:
        run([x]).backward()  # gradients accumulate, as HASS's backward per step does
    torch.testing.assert_close(summed, weight.grad)


def test_no_supervised_index_gives_zero_loss() -> None:
    """A batch without supervised indices has loss 0 and zero weights (it still backpropagates)."""
    prediction = torch.randn(1, 4, 3, requires_grad=True)
    out = hass_loss(
        [prediction],
        torch.randn(1, 4, 3),
        torch.zeros(1, 4, dtype=torch.bool),
        head=lambda x: x @ torch.ones(3, 5),
        target_head=lambda x: x @ torch.ones(3, 5),
        weights=HassLossWeights(),
    )
    assert out.loss.item() == 0.0
    assert int(out.weights["loss"]) == 0
    out.loss.backward()


def test_weights_are_validated() -> None:
    """Negative weights and K < 1 are one-line errors."""
    with pytest.raises(SpeculatorsError, match="topk_w must be >= 0"):
        HassLossWeights(topk_w=-1.0)
    with pytest.raises(SpeculatorsError, match="topk must be at least 1"):
        HassLossWeights(topk=0)
