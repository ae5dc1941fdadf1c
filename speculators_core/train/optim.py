"""Optimizer and learning-rate schedule of a run."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from speculators_core.train.arguments import TrainingArguments
from speculators_core.train.errors import TrainingConfigError

__all__ = ["build_optimizer", "build_scheduler", "lr_lambda", "optimizer_class", "warmup_steps"]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name`` (case-insensitive), or a clear error."""
    available = {
        attr.lower(): obj
        for attr, obj in vars(torch.optim).items()
        if inspect.isclass(obj)
        and issubclass(obj, torch.optim.Optimizer)
        and obj is not torch.optim.Optimizer
    }
    cls = available.get(name.lower())
    if cls is None:
        raise TrainingConfigError(
            f"unknown optimizer '{name}'; choose one of torch.optim's: {', '.join(sorted(available))}"
        )
    return cls


def build_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters of ``model``.

    Matrices (2+ dims) get ``args.weight_decay``; vectors (norm weights, biases) get none, since
    decaying them only pulls scales towards zero.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise TrainingConfigError(
            f"{type(model).__name__} has no trainable parameters; nothing to train"
        )
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    cls = optimizer_class(args.optimizer)
    kwargs = dict(args.optimizer_kwargs)
    if "betas" in kwargs and isinstance(kwargs["betas"], list):
        kwargs["betas"] = tuple(kwargs["betas"])  # JSON has no tuples
    try:
        return cls(groups, lr=args.learning_rate, **kwargs)  # type: ignore[call-arg]
    except TypeError as err:
        raise TrainingConfigError(
            f"optimizer '{args.optimizer}' rejects optimizer_kwargs {kwargs!r}: {err}"
        ) from err


def warmup_steps(args: TrainingArguments, total_steps: int) -> int:
    """Warm-up length: ``args.warmup_steps`` or ``warmup_ratio`` of the run (rounded up)."""
    if args.warmup_steps is not None:
        return args.warmup_steps
    return math.ceil(args.warmup_ratio * total_steps)


def lr_lambda(
    scheduler: str, warmup: int, total_steps: int, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """The multiplier of the peak learning rate after ``step`` optimizer steps.

    Linear warm-up from ``1/(warmup+1)`` to 1 over ``warmup`` steps (never exactly 0, so the
    first step moves), then ``constant``, or ``linear``/``cosine`` decay to ``min_ratio`` at
    ``total_steps``.
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if scheduler == "constant":
            return 1.0
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        if scheduler == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + decay schedule, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda(
            args.lr_scheduler, warmup_steps(args, total_steps), total_steps, args.min_lr_ratio
        ),
    )
