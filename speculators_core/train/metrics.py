"""Exact combination of per-micro-batch metrics over micro-batches, steps and processes.

An algorithm's ``training_step`` returns each metric as an average together with the count it
averages over (``TrainingStepOutput.weights``). Summing ``value x weight`` and ``weight``
separately and dividing at the end gives the metric of the whole global batch, exactly as if it
had been one batch, whatever the split into micro-batches and processes.
"""

from __future__ import annotations

import torch

from speculators_core.model import TrainingStepOutput
from speculators_core.train.distributed import DistributedContext

__all__ = ["WeightedSums"]


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
        """Add every metric of a training step (``loss`` included, weighted like the loss)."""
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
