"""Training metrics: the ones the core derives, and their exact combination over batches.

**Naming convention.** An algorithm's ``training_step`` reports, per draft position ``i``
(``i = 0`` is the first drafted token), any of:

* ``loss_{i}``: the loss term of position ``i``;
* ``full_acc_{i}``: the fraction of scored positions where the draft's tokens ``0..i`` all
  equal the verifier's (``i + 1`` drafted tokens would all be accepted);
* ``cond_acc_{i}``: the accuracy at position ``i`` among positions whose tokens ``< i`` were
  all correct (the acceptance of draft ``i`` given the earlier ones were accepted);

each with its count in ``TrainingStepOutput.weights`` (``full_acc_{i}``: the scored
positions; ``cond_acc_{i}``: the positions that survived to ``i``).

**Derived by the core.** From those, :func:`derive_metrics` adds ``est_accept_len``, the
expected number of tokens per verification round, ``1 + sum_i full_acc_i`` (the accepted drafts
plus the verifier's own token). An algorithm that reports only ``cond_acc_{i}`` gets
``full_acc_i = prod_{j <= i} cond_acc_j``. The name is the core's: an algorithm's own
``est_accept_len`` is replaced.

**Combination.** Each metric is an average with the count it averages over. Summing
``value x weight`` and ``weight`` separately and dividing at the end gives the metric of the
whole global batch, exactly as if it had been one batch, whatever the split into micro-batches
and processes. ``est_accept_len`` is derived per micro-batch and weighted by the count of
position 0 (the positions it is an estimate over), so a logged value is the mean of the
micro-batches' estimates weighted by their scored positions.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from speculators_core.model import TrainingStepOutput
from speculators_core.train.distributed import DistributedContext

__all__ = ["WeightedSums", "derive_metrics", "est_accept_len"]

#: Metric names of the per-position convention (see the module docs), by kind.
FULL_ACC, COND_ACC = "full_acc_", "cond_acc_"


def _per_position(metrics: Mapping[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    """``metrics[prefix + "0"]``, ``metrics[prefix + "1"]``, ... up to the first gap."""
    values: list[torch.Tensor] = []
    while f"{prefix}{len(values)}" in metrics:
        values.append(metrics[f"{prefix}{len(values)}"])
    return values


def est_accept_len(metrics: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """``1 + sum_i full_acc_i`` from one training step's per-position metrics (``None`` when it
    reports neither ``full_acc_{i}`` nor ``cond_acc_{i}``).

    The sum runs in float32 from position 0 up, in that order (a different order or dtype
    changes the last bits of the logged value).
    """
    full = _per_position(metrics, FULL_ACC)
    if not full:
        cond = _per_position(metrics, COND_ACC)
        if not cond:
            return None
        # Chance that positions 0..i are all accepted = product of the conditional acceptances.
        full = list(torch.cumprod(torch.stack([c.detach().float() for c in cond]), dim=0))
    total = torch.ones((), dtype=torch.float32, device=full[0].device)
    for value in full:
        total = total + value.detach().float()
    return total


def derive_metrics(output: TrainingStepOutput) -> TrainingStepOutput:
    """``output`` with the metrics the core derives (``est_accept_len``) added.

    Its weight is the count of position 0 (``full_acc_0``'s, else ``cond_acc_0``'s; 1 when the
    algorithm gives none). ``output`` itself is not changed.
    """
    value = est_accept_len(output.metrics)
    if value is None:
        return output
    prefix = FULL_ACC if f"{FULL_ACC}0" in output.metrics else COND_ACC
    weights = dict(output.weights)
    weights.pop("est_accept_len", None)
    if f"{prefix}0" in weights:
        weights["est_accept_len"] = weights[f"{prefix}0"]
    return TrainingStepOutput(
        loss=output.loss, metrics={**output.metrics, "est_accept_len": value}, weights=weights
    )


class WeightedSums:
    """Running ``sum(value * weight)`` and ``sum(weight)`` per metric name."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self.weights)

    def add(self, name: str, value: float, weight: float) -> None:
        """Add one average ``value`` over ``weight`` items."""
        self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.weights[name] = self.weights.get(name, 0.0) + weight

    def add_output(self, output: TrainingStepOutput) -> None:
        """Add every metric of a training step (``loss`` included, weighted like the loss), and
        the ones the core derives from them (:func:`derive_metrics`)."""
        output = derive_metrics(output)
        metrics = dict(output.metrics)
        metrics.setdefault("loss", output.loss.detach())
        for name, value in metrics.items():
            weight = output.weights.get(name)
            self.add(
                name,
                float(value.detach().float()) if torch.is_tensor(value) else float(value),
                1.0 if weight is None else float(weight),
            )

    def merge(self, other: WeightedSums) -> None:
        """Add ``other``'s sums into these."""
        for name in other.weights:
            self.sums[name] = self.sums.get(name, 0.0) + other.sums[name]
            self.weights[name] = self.weights.get(name, 0.0) + other.weights[name]

    def all_reduce(self, ctx: DistributedContext) -> WeightedSums:
        """The sums over all processes (a metric some process lacks counts as zero there)."""
        if not ctx.distributed:
            return self
        # Agree on the names first: an algorithm may leave out a metric on a batch without
        # the tokens it is about, and the summed tensor must have the same layout everywhere.
        names = sorted(set().union(*ctx.all_gather_object(sorted(self.weights))))
        packed = torch.tensor(
            [self.sums.get(n, 0.0) for n in names] + [self.weights.get(n, 0.0) for n in names],
            dtype=torch.float64,
        )
        ctx.all_reduce_sum(packed)
        out = WeightedSums()
        k = len(names)
        for i, name in enumerate(names):
            out.sums[name] = float(packed[i])
            out.weights[name] = float(packed[k + i])
        return out

    def averages(self, prefix: str = "") -> dict[str, float]:
        """``{prefix + name: sum / weight}`` (a metric with zero total weight is left out)."""
        return {
            prefix + name: self.sums[name] / self.weights[name]
            for name in sorted(self.weights)
            if self.weights[name] > 0
        }
